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
    """Rank 0: the checkpoints of every `every`-th scheduled save, and the final one, →
    `<run_dir>/exports/<tag>`, in a background process.

    Which checkpoints is decided by their step (a multiple of `every × save_every`, or the last
    step), not counted per attempt, so a requeued or resumed run exports the same ones as an
    uninterrupted run would. `every` = 1 exports every checkpoint, preemption saves included. The
    checkpoint an attempt resumes from is exported at its start if it was due and its export is
    missing (the attempt that wrote it was killed first; an export appears whole or not at all)."""

    def __init__(self, run_dir: str | Path, every: int, *, save_every: int, max_steps: int):
        self.run_dir = Path(run_dir)
        self.every, self.save_every, self.max_steps = every, save_every, max_steps
        self.last_step = 0  # the step of the newest checkpoint seen
        self.running: list[subprocess.Popen] = []

    def due(self, step: int) -> bool:
        """Whether the checkpoint of `step` is exported."""
        period = self.every * self.save_every
        return self.every == 1 or step == self.max_steps or bool(period and step % period == 0)

    def on_train_start(self, trainer: Trainer) -> None:
        self.last_step = trainer.step  # the checkpoint resumed from, if any: its attempt exported it…
        tag = tag_for_step(trainer.step)
        own = (checkpoints_dir(self.run_dir) / tag).is_dir()  # not a branch point (run.start_from)
        if (
            trainer.step
            and own
            and self.due(trainer.step)
            and not (self.run_dir / EXPORTS_DIR / tag).exists()
        ):
            self._export(trainer.step)  # …unless it was killed first

    def on_step_end(self, trainer: Trainer) -> None:
        self._export_if_new(trainer)

    def on_train_end(self, trainer: Trainer) -> None:
        if trainer.stopped_early:  # the final checkpoint, though short of max_steps
            self.max_steps = trainer.step
        self._export_if_new(trainer)  # the final checkpoint
        for proc in self.running:  # let exports in flight finish: they read checkpoints pruning may remove
            if proc.wait() != 0:
                log.warning("a background export exited %d (see %s/logs)", proc.returncode, self.run_dir)

    def _export_if_new(self, trainer: Trainer) -> None:
        step = trainer.last_saved_step or 0  # set once a save is complete (renamed, `latest` updated)
        if step <= self.last_step:
            return
        self.last_step = step
        if self.due(step):
            self._export(step)

    def _export(self, step: int) -> None:
        tag = tag_for_step(step)
        logs = self.run_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        out = self.run_dir / EXPORTS_DIR / tag
        ckpt = checkpoints_dir(self.run_dir) / tag
        with open(logs / f"export-{tag}.log", "w") as fh:
            cmd = [sys.executable, "-m", "ds_train", "convert", "to-hf", str(ckpt), str(out), "--force"]
            self.running.append(subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT))
        log.info("exporting %s to %s in the background", tag, out)
