"""Skip the update of a step whose loss or gradient norm spikes (train.skip_spike_sigma).

OLMo-core's SkipStepOptimizer rule (OLMo 2 trains with it at 6σ over 128 steps): a step whose
global loss, or global gradient norm, lies more than `sigma` standard deviations above the mean of
the previous `window` steps' is not applied: the weights and Adam's moments stay as they were, so
one bad batch cannot throw the run off or leave a large gradient in the second moment for hundreds
of steps. The learning-rate schedule and the data go on (the batch is consumed). The rule is active
once half the window is filled; every finite value joins the history, skipped or not, so a lasting
shift in level (a new data mix) stops counting as a spike after a while.

Every rank decides alike: the loss is all-reduced and the gradient norm is DeepSpeed's global one.
The history is part of the checkpoint, so a resumed run skips exactly the steps the uninterrupted
one would have. It costs one scalar all-reduce and one host sync per step, and is off by default.
DeepSpeed steps the optimizer inside engine.step(); the gate that asks `allow` is
distributed/engine.py's `gate_optimizer_step`.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections import deque
from typing import Any

import torch

log = logging.getLogger(__name__)


class SpikeGuard:
    def __init__(self, sigma: float, window: int, is_main: bool = True, state: dict | None = None):
        self.sigma, self.window, self.is_main = sigma, window, is_main
        state = state or {}
        self.losses: deque[float] = deque(state.get("losses", []), maxlen=window)
        self.grad_norms: deque[float] = deque(state.get("grad_norms", []), maxlen=window)
        self.skipped_steps: int = state.get("skipped_steps", 0)
        self._armed: tuple[int, torch.Tensor] | None = None  # (step, its global mean loss)
        self._decision: bool | None = None

    @property
    def enabled(self) -> bool:
        return self.sigma > 0

    def state(self) -> dict:
        return {
            "losses": list(self.losses),
            "grad_norms": list(self.grad_norms),
            "skipped_steps": self.skipped_steps,
        }

    def arm(self, step: int, loss: torch.Tensor) -> None:
        """This step's global mean loss (a device scalar), given before its update runs."""
        self._armed, self._decision = (step, loss), None

    def allow(self, grad_norm: Any) -> bool:
        """Whether the armed step's update runs, from its loss and global gradient norm (a float,
        a tensor, or None where DeepSpeed computed none). ZeRO-3 steps its optimizer once per
        sub-group: the first call decides for the step."""
        if self._decision is None:
            self._decision = self._decide(grad_norm)
        return self._decision

    def _decide(self, grad_norm: Any) -> bool:
        if self._armed is None:  # an update outside a training step: not ours to judge
            return True
        step, loss_tensor = self._armed
        self._armed = None
        loss = float(loss_tensor)
        norm = None if grad_norm is None else float(grad_norm)
        spikes = [
            s
            for s in (
                self._spike("loss", loss, self.losses),
                self._spike("gradient norm", norm, self.grad_norms),
            )
            if s
        ]
        for value, history in ((loss, self.losses), (norm, self.grad_norms)):
            if value is not None and math.isfinite(value):  # a NaN would poison every later mean
                history.append(value)
        if not spikes:
            return True
        self.skipped_steps += 1
        if self.is_main:
            log.warning(
                "step %d: update skipped (train.skip_spike_sigma=%g): %s; %d skipped so far",
                step,
                self.sigma,
                "; ".join(spikes),
                self.skipped_steps,
            )
        return False

    def _spike(self, name: str, value: float | None, history: deque[float]) -> str | None:
        """A description of the spike, or None when `value` is within sigma of the history."""
        if value is None or not math.isfinite(value) or len(history) < max(2, self.window // 2):
            return None  # a non-finite step is train.nonfinite's (DeepSpeed discards its update)
        mean, std = statistics.fmean(history), statistics.stdev(history)
        if value - mean <= self.sigma * std:
            return None
        above = f"{(value - mean) / std:.1f}σ" if std > 0 else "above a constant"
        return f"{name} {value:.4g} is {above} over the mean of the last {len(history)} steps ({mean:.4g} ± {std:.2g})"
