"""Learning-rate schedule: linear warmup, then cosine or linear decay to lr × min_lr_ratio."""

from __future__ import annotations

import math
from collections.abc import Callable


def lr_multiplier(
    schedule: str, warmup_steps: int, max_steps: int, min_lr_ratio: float
) -> Callable[[int], float]:
    """The factor applied to the peak lr at optimizer step `step` (0-based, as LambdaLR counts).

    A plain function rather than an object: LambdaLR saves the attributes of callable objects in
    the checkpoint, which would pin the old max_steps when a resumed run extends training.
    """

    def multiplier(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        span = max(1, max_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        if schedule == "linear":
            decay = 1.0 - progress
        else:
            decay = 0.5 * (1.0 + math.cos(math.pi * progress))
        return min_lr_ratio + (1.0 - min_lr_ratio) * decay

    return multiplier
