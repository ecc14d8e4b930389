"""Hugging Face directories written during and after a run, by `ds-train convert to-hf`'s code.

Both read a complete checkpoint from disk rather than gathering the live model: the output is the
same as a later `ds-train convert to-hf` would give, and no rank waits on it. The final export runs
on rank 0 once the process group is gone (a slow conversion cannot trip a collective timeout on
the other ranks). The periodic one (`train.export_hf_every`) converts every N-th checkpoint in a
background process, logged to `<output_dir>/logs/`, so training never waits for it either.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ds_train.checkpoint.layout import checkpoints_dir, latest_checkpoint, tag_for_step
from ds_train.train.callbacks.base import Callback

if TYPE_CHECKING:
    from ds_train.train.trainer import Trainer

log = logging.getLogger(__name__)

HF_DIR = "hf"  # the final export
EXPORTS_DIR = "exports"  # periodic ones, one directory per checkpoint tag


def export_final(run_dir: str | Path) -> Path:
    """`<run_dir>/hf` from the run's latest checkpoint (replaced atomically)."""
    from ds_train.convert.to_hf import convert_checkpoint

    run_dir = Path(run_dir)
    ref = latest_checkpoint(checkpoints_dir(run_dir))
    out = convert_checkpoint(ref.path, run_dir / HF_DIR)
    log.info("exported step %d to %s", ref.step, out)
    return out


class PeriodicHfExport(Callback):
    """Rank 0: every `every`-th checkpoint → `<run_dir>/exports/<tag>`, in a background process."""

    def __init__(self, run_dir: str | Path, every: int):
        self.run_dir = Path(run_dir)
        self.every = every
        self.last_step = 0  # the step of the newest checkpoint seen
        self.seen = 0
        self.running: list[subprocess.Popen] = []

    def on_step_end(self, trainer: Trainer) -> None:
        self._export_if_new(trainer)

    def on_train_end(self, trainer: Trainer) -> None:
        self._export_if_new(trainer)  # the final checkpoint
        for proc in self.running:  # let exports in flight finish: they read checkpoints pruning may remove
            if proc.wait() != 0:
                log.warning("a background export exited %d (see %s/logs)", proc.returncode, self.run_dir)

    def _export_if_new(self, trainer: Trainer) -> None:
        step = trainer.last_saved_step or 0  # set once a save is complete (renamed, `latest` updated)
        if step <= self.last_step:
            return
        self.last_step = step
        self.seen += 1
        if self.seen % self.every:
            return
        tag = tag_for_step(step)
        logs = self.run_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        out = self.run_dir / EXPORTS_DIR / tag
        ckpt = checkpoints_dir(self.run_dir) / tag
        with open(logs / f"export-{tag}.log", "w") as fh:
            cmd = [sys.executable, "-m", "ds_train", "convert", "to-hf", str(ckpt), str(out), "--force"]
            self.running.append(subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT))
        log.info("exporting %s to %s in the background", tag, out)
