"""`train.epochs`: a run length in passes over the training data, turned into `train.max_steps`.

Fine-tuning recipes are written in epochs (the transformers Trainer's num_train_epochs); the loop,
the schedule, checkpoints and resume all count optimizer steps. The preflight resolves one into
the other, once, before anything reads `train.max_steps`:

    max_steps = ceil(epochs × rows / global_batch_size)

(with `train.batch_ramp`, the steps that take epochs × rows samples, the ramp's smaller ones first).

`rows` is what one pass reads: the training shard sets' rows together (pretraining, SFT shards), or
the tokenized train split's rows (finetune.train_file: examples, or packed rows). The last step may
run into the next pass by up to a global batch (rows wrap into the next epoch, as in any step).
"""

from __future__ import annotations

import logging
import math

from ds_train.config import Config
from ds_train.data.batch_schedule import BatchSchedule

log = logging.getLogger(__name__)


def resolve_epochs(cfg: Config, rows: int, what: str) -> None:
    """Set `cfg.train.max_steps` from `cfg.train.epochs` (no-op without it); `what` names the data
    counted, for the log line. Re-runs the checks of train.max_steps that validate() skipped."""
    t = cfg.train
    if t.epochs is None:
        return
    t.max_steps = max(
        1, BatchSchedule.of(t.global_batch_size, t.batch_ramp).steps_for(math.ceil(t.epochs * rows))
    )
    t.from_epochs = True  # not a field: validate() must not read it as the user setting both
    log.info(
        "train.epochs=%g: %d rows of %s a pass, %d rows a step%s → train.max_steps=%d",
        t.epochs,
        rows,
        what,
        t.global_batch_size,
        " after train.batch_ramp" if t.batch_ramp else "",
        t.max_steps,
    )
    from ds_train.config.validate import check_profile_window

    check_profile_window(cfg)


def steps_line(cfg: Config) -> str:
    """The run length for `--check`: `max_steps 30` or `max_steps 30 (train.epochs=2)`."""
    from ds_train.train.schedule import warmup_note

    t = cfg.train
    note = warmup_note(t)
    if note is None and not t.warmup_steps and not cfg.model.init_from and t.schedule != "constant":
        # a fresh model's first Adam updates at the full rate (pretraining audit: accepted silently)
        note = (
            "train.warmup_steps=0 for a model trained from scratch: most recipes warm up over 1-2% of the run"
        )
    ramp = BatchSchedule.of(t.global_batch_size, t.batch_ramp)
    return (
        f"max_steps {t.max_steps}"
        + (f" (train.epochs={t.epochs:g})" if t.epochs is not None else "")
        + (f"; {ramp.describe()} (train.batch_ramp)" if ramp.ramp else "")
        + (f"; warning: {note}" if note else "")
    )
