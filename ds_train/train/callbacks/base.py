"""The callback interface: the trainer calls these hooks on every rank; sinks act on rank 0."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ds_train.train.trainer import Trainer


class Callback:
    def on_train_start(self, trainer: Trainer) -> None:
        """After the engine is built and any checkpoint loaded, before the first step."""

    def on_step_start(self, trainer: Trainer) -> None:
        """Before each step fetches its first batch (trainer.step is the number of steps done)."""

    def on_step_end(self, trainer: Trainer) -> None:
        """After each optimizer step (trainer.step is the number of steps done)."""

    def on_log(self, trainer: Trainer, record: dict) -> None:
        """Every train.log_every steps, with the metrics record written to metrics.jsonl."""

    def on_checkpoint_written(self, trainer: Trainer, directory: Path, step: int) -> None:
        """On every rank inside a save, once this rank's files are in `directory` (still partial).
        `step` is the checkpoint's: with train.save_async training has gone on past it."""

    def on_eval(self, trainer: Trainer, record: dict) -> None:
        """After each validation pass."""

    def on_train_end(self, trainer: Trainer) -> None:
        """After the last step and the final checkpoint, also when stopping early."""

    def on_train_error(self, trainer: Trainer, error: BaseException) -> None:
        """Training is ending with `error`, which propagates after (on_train_end does not run). Peers
        may be dead: no collectives here. An exception raised here is logged, never raised in
        place of `error`."""
