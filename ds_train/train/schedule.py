"""Learning-rate schedule: linear warmup, then cosine or linear decay to lr × min_lr_ratio, or
warmup-stable-decay (wsd): the peak held, then a cooldown over the last decay_steps."""

from __future__ import annotations

import math
from collections.abc import Callable


def lr_multiplier(
    schedule: str, warmup_steps: int, max_steps: int, min_lr_ratio: float, decay_steps: int | None = None
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
        start = warmup_steps
        if schedule in ("wsd", "wsd_sqrt"):  # stable until the cooldown's first step
            start = max(warmup_steps, max_steps - wsd_decay_steps(max_steps, decay_steps))
            if step < start:
                return 1.0
        span = max(1, max_steps - start)
        progress = min(1.0, (step - start) / span)
        if schedule in ("linear", "wsd"):
            decay = 1.0 - progress
        elif schedule == "wsd_sqrt":  # 1-sqrt: matched a cosine run's loss in Hägele et al. 2024
            decay = 1.0 - math.sqrt(progress)
        else:
            decay = 0.5 * (1.0 + math.cos(math.pi * progress))
        return min_lr_ratio + (1.0 - min_lr_ratio) * decay

    return multiplier


def wsd_decay_steps(max_steps: int, decay_steps: int | None) -> int:
    """The cooldown of a wsd schedule: train.decay_steps, or 20% of the run (MiniCPM's 10%, and
    DeepSeek LLM's 20% of tokens, bracket it)."""
    return decay_steps if decay_steps is not None else max(1, round(0.2 * max_steps))


SCHEDULE_KEYS = ("schedule", "warmup_steps", "max_steps", "min_lr_ratio", "decay_steps")


def train_lr_multiplier(train) -> Callable[[int], float]:
    """`lr_multiplier` of a train section's schedule settings."""
    return lr_multiplier(*(getattr(train, k) for k in SCHEDULE_KEYS))


def schedule_settings(train) -> dict:
    """What decides the learning rate at each step (train section), as saved in each checkpoint."""
    return {"lr": train.lr, **{k: getattr(train, k) for k in SCHEDULE_KEYS}}


def schedule_change_note(saved: dict | None, train, step: int) -> str | None:
    """A warning when a resume changes the schedule: it is recomputed over the new settings from the
    resumed step, so the learning rate jumps (raising max_steps after a cosine run ended took it from
    1.1e-4 to 4.1e-4 in one step, silently: sweep audit). None when nothing changed (or the
    checkpoint predates the record)."""
    if not saved:
        return None
    changes = [
        f"train.{k} {saved.get(k)} → {getattr(train, k)}"
        for k in SCHEDULE_KEYS
        if saved.get(k) != getattr(train, k)
    ]
    if not changes:
        return None
    before = saved["lr"] * lr_multiplier(*(saved.get(k) for k in SCHEDULE_KEYS))(step)
    after = train.lr * train_lr_multiplier(train)(step)
    if math.isclose(before, after, rel_tol=1e-9):  # no jump (a wsd run extended before its cooldown)
        return None
    return (
        f"the learning-rate schedule changed since the checkpoint ({'; '.join(changes)}): it is recomputed "
        f"over the new settings, so step {step + 1} trains at lr {after:.3g} where the checkpoint's schedule "
        f"gave {before:.3g}"
    )


def warmup_note(train) -> str | None:
    """A warning when the warmup spans the whole run: the schedule never decays, and a warmup
    longer than the run never reaches train.lr (accepted silently before: sweep audit); or when a
    wsd cooldown does not fit after the warmup (it is cut short)."""
    if train.max_steps is None:
        return None
    if train.schedule.startswith("wsd") and train.warmup_steps < train.max_steps:
        asked = wsd_decay_steps(train.max_steps, train.decay_steps)
        room = train.max_steps - train.warmup_steps
        if asked > room:
            return (
                f"the wsd cooldown of {asked} steps is cut to {room}: it starts where train.warmup_steps ends"
            )
    if not train.warmup_steps or train.warmup_steps < train.max_steps:
        return None
    peak = min(1.0, train.max_steps / train.warmup_steps)
    return (
        f"train.warmup_steps={train.warmup_steps} spans the whole run (train.max_steps={train.max_steps}): "
        f"the {train.schedule} schedule never decays"
        + (f", and the learning rate peaks at {peak:.2g} × train.lr" if peak < 1 else "")
    )
