"""TensorBoard and Weights & Biases sinks (rank 0 only).

The writers are used directly rather than through accelerate's tracker classes: those route every
call through accelerate's PartialState, a second process-state singleton next to the process
group ds_train already set up.
"""

from __future__ import annotations

import logging
import os
import secrets
import string
from pathlib import Path

from ds_train.train.callbacks.base import Callback

log = logging.getLogger(__name__)


def _scalars(record: dict) -> dict[str, float]:
    """The record's numbers; a dict of them (train.per_layer_norms_every's per-layer norms) becomes
    one scalar per key, `layer_grad_norm/model.layers.3`."""
    out: dict[str, float] = {}
    for k, v in record.items():
        if isinstance(v, dict):
            out.update({f"{k}/{name}": float(x) for name, x in v.items() if _number(x)})
        elif _number(v) and k != "step":
            out[k] = float(v)
    return out


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


class TensorBoard(Callback):
    """Writer opened at the start, knowing the step: a resumed attempt purges the events an
    interrupted one wrote after the checkpoint (`purge_step`), so curves do not fold back over the
    steps trained twice (metrics.jsonl keeps both; `ds-train report` lets the later one win)."""

    def __init__(self, run_dir: str | Path):
        self.log_dir = Path(run_dir) / "tensorboard"
        self.writer = None

    def on_train_start(self, trainer) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(
            log_dir=str(self.log_dir),
            purge_step=trainer.step + 1,  # also at 0: a crashed first attempt
        )

    def on_log(self, trainer, record: dict) -> None:
        for k, v in _scalars(record).items():
            self.writer.add_scalar(f"train/{k}", v, global_step=record["step"])

    def on_eval(self, trainer, record: dict) -> None:
        for k, v in _scalars(record).items():
            tag = k if k.startswith("downstream/") else f"valid/{k.removeprefix('valid_')}"
            self.writer.add_scalar(tag, v, global_step=record["step"])

    def on_train_end(self, trainer) -> None:
        if self.writer is not None:
            self.writer.close()

    def on_train_error(self, trainer, error: BaseException) -> None:
        if self.writer is not None:
            self.writer.close()  # flushes the events up to the failure


class WandB(Callback):
    """Every attempt of a run logs to one W&B run (its id kept in the run directory). W&B takes
    only increasing steps: after a resume, the steps an interrupted attempt logged past its
    checkpoint keep its values and the repeats are dropped (W&B warns), unlike TensorBoard above.
    W&B's rewind would replace them but is a private preview, so it is not relied on."""

    def __init__(self, run):
        self.run = run

    def on_log(self, trainer, record: dict) -> None:
        self.run.log(_scalars(record), step=record["step"])

    def on_eval(self, trainer, record: dict) -> None:
        self.run.log(_scalars(record), step=record["step"])

    def on_train_end(self, trainer) -> None:
        self.run.finish()

    def on_train_error(self, trainer, error: BaseException) -> None:
        self.run.finish(exit_code=1)  # marked failed, not left running


WANDB_ID_FILE = "wandb_run_id"  # in the run directory: every attempt of a run logs to one W&B run


def wandb_callback(run_name: str, project: str | None, config: dict, run_dir: str | Path) -> WandB | None:
    """A W&B sink, or None (with a warning) when wandb is missing or cannot start: never fail a run over it.

    Offline unless WANDB_MODE says otherwise: compute nodes often have no route out, and a run's
    config and metrics leave the cluster only when the user asks (`WANDB_MODE=online`, or
    `wandb sync` on the offline directory afterwards). The run id is drawn once and kept in the
    run directory, so a requeued or resumed job continues the same W&B run and two run
    directories never share one (their names alone may: runs/a/pretrain, runs/b/pretrain)."""
    try:
        import wandb

        id_file = Path(run_dir) / WANDB_ID_FILE
        if not id_file.is_file():
            id_file.write_text(new_run_id() + "\n")
        run = wandb.init(
            project=project or "ds_train",
            name=run_name,
            config=config,
            dir=str(run_dir),
            resume="allow",
            id=id_file.read_text().strip(),
            mode=None if os.environ.get("WANDB_MODE") else "offline",
        )
    except Exception as e:
        log.warning("Weights & Biases disabled: %s", e)
        return None
    return WandB(run)


def new_run_id() -> str:
    """A W&B run id: 8 characters of [a-z0-9], W&B's own format. Drawn here, not with
    `wandb.util.generate_id`, which current wandb releases no longer have (W&B then failed to
    start, with only a warning, and every run went untracked)."""
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))
