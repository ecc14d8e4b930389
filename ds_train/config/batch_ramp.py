"""The check of `train.batch_ramp` as configured (its meaning: ds_train/data/batch_schedule.py)."""

from __future__ import annotations

from ds_train.config.loader import ConfigError


def check_ramp(ramp: list, global_batch_size: int, micro_batch_size: int) -> None:
    """train.batch_ramp as configured: [last step, global batch] stages, steps increasing from 1,
    each batch a multiple of micro_batch_size and at most global_batch_size (DeepSpeed is set up
    for the largest). Whether each is a whole number of accumulation steps on the ranks of a run
    is checked when they are known (distributed/deepspeed_config.py: batch_layout)."""
    previous = 0
    for stage in ramp:
        if not (
            isinstance(stage, list)
            and len(stage) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in stage)
        ):
            raise ConfigError(f"train.batch_ramp: each stage is [last step, global batch], got {stage!r}")
        until, size = stage
        if until <= previous:
            raise ConfigError(
                f"train.batch_ramp: the stages' last steps must increase from 1, got {until} after {previous}"
            )
        if not 0 < size <= global_batch_size or size % micro_batch_size:
            raise ConfigError(
                f"train.batch_ramp: the batch to step {until} is {size}; each stage's global batch must be "
                f"a multiple of train.micro_batch_size={micro_batch_size} and at most "
                f"train.global_batch_size={global_batch_size} (a ramp grows to it)"
            )
        previous = until
