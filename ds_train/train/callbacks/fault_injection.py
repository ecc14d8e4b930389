"""Fault injection for reliability tests, armed only by the DS_TRAIN_FAULT environment variable.

    DS_TRAIN_FAULT="kill@step=7"          SIGKILL every rank right after step 7
    DS_TRAIN_FAULT="kill@step=7,rank=1"   SIGKILL only rank 1 (the others must not hang)
    DS_TRAIN_FAULT="hang@step=7,rank=1"   rank 1 stops taking part (alive, sockets open): the others
                                          must give up after run.collective_timeout_s
    DS_TRAIN_FAULT="nan@step=7,rank=1"    rank 1's loss in step 7 is NaN (train.nonfinite decides)
    DS_TRAIN_FAULT="spike@step=7,x=100"   every rank's loss (and so its gradient) in step 7 is 100×
                                          as large (train.skip_spike_sigma decides)
    DS_TRAIN_FAULT="slow@step=7,rank=1,ms=200"
                                          from step 7 on, each of rank 1's training forwards takes
                                          200 ms longer, inside its linear layers (a straggler;
                                          default 100 ms; a forward recomputed under activation
                                          checkpointing again)
    DS_TRAIN_FAULT="kill@save=8,rank=1"   SIGKILL inside the save of step 8, once this rank's files
                                          are written and before the checkpoint is complete
    DS_TRAIN_FAULT="enospc@save=8,rank=1" that save fails with OSError(ENOSPC) on rank 1

Several faults are separated by ';'. Without `rank=` a fault fires on every rank. The callback is
not installed at all when the variable is unset.
"""

from __future__ import annotations

import errno
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ds_train.train.callbacks.base import Callback
from ds_train.train.stragglers import linear_layers

ENV = "DS_TRAIN_FAULT"
KINDS = {
    "kill": ("step", "save"),
    "hang": ("step",),
    "nan": ("step",),
    "spike": ("step",),
    "slow": ("step",),
    "enospc": ("save",),
}
# they scale the loss (silently: train.nonfinite and the spike guard report them)
LOSS_FAULTS = ("nan", "spike")


@dataclass(frozen=True)
class Fault:
    kind: str
    point: str  # "step" or "save"
    step: int
    rank: int | None
    delay_ms: int = 100  # slow: added to each forward
    factor: float = 1.0  # spike: the loss is multiplied by it

    def fires(self, point: str, step: int, rank: int) -> bool:
        return self.point == point and self.step == step and self.rank in (None, rank)


def parse(spec: str) -> list[Fault]:
    faults = []
    for item in filter(None, (s.strip() for s in spec.split(";"))):
        kind, _, params = item.partition("@")
        values = dict(p.split("=", 1) for p in params.split(",") if "=" in p)
        points = [p for p in KINDS.get(kind, ()) if p in values]
        if len(points) != 1:
            raise ValueError(
                f"{ENV}: cannot parse {item!r} (see ds_train/train/callbacks/fault_injection.py)"
            )
        if int(values.get("ms", 0)) < 0:
            raise ValueError(f"{ENV}: {item!r}: ms must be ≥ 0")
        rank = int(values["rank"]) if "rank" in values else None
        factor = float(values.get("x", 100.0)) if kind == "spike" else 1.0
        faults.append(
            Fault(kind, points[0], int(values[points[0]]), rank, int(values.get("ms", 100)), factor)
        )
    return faults


class _ScaledLoss:
    """The objective, except that the summed loss is multiplied by `factor()` (NaN, or a spike's
    factor; None: left alone)."""

    def __init__(self, objective, factor):
        self._objective, self._factor = objective, factor

    def loss_sum(self, model, batch):
        loss = self._objective.loss_sum(model, batch)
        factor = self._factor()
        if factor is not None and "source_loss" in batch:  # a mixture's per-source sums alike
            batch["source_loss"][:, 0] *= factor
        return loss if factor is None else loss * factor

    def __getattr__(self, name):
        return getattr(self._objective, name)


def _slow_down(model: torch.nn.Module, delay_s) -> None:
    """Each training forward of `model` takes `delay_s()` longer, spread over its linear layers and
    inside each (a hook that runs before any other), as slower matrix products would be."""
    layers = linear_layers(model)

    # kept out of compiled blocks (model.compile), as the straggler clock's hooks are: traced, the
    # hook would guard on the step its delay reads and recompile at every step
    @torch.compiler.disable
    def sleep(module, args, out) -> None:
        if module.training:
            time.sleep(delay_s() / len(layers))

    for layer in layers:
        layer.register_forward_hook(sleep, prepend=True)


class FaultInjection(Callback):
    def __init__(self, faults: list[Fault]):
        self.faults = faults

    @classmethod
    def from_env(cls) -> FaultInjection | None:
        spec = os.environ.get(ENV)
        return cls(parse(spec)) if spec else None

    def _fired(self, trainer, kind: str, point: str, step: int) -> bool:
        fired = any(f.kind == kind and f.fires(point, step, trainer.ctx.rank) for f in self.faults)
        if fired and kind not in LOSS_FAULTS:  # when it happened, to time the run's reaction from outside
            print(
                f"{ENV}: {kind}@{point}={step} on rank {trainer.ctx.rank} at {time.time():.3f}",
                file=sys.stderr,
                flush=True,
            )
        return fired

    def on_train_start(self, trainer) -> None:
        # trainer.step counts finished steps: step N is computed while it reads N - 1
        if any(f.kind in LOSS_FAULTS for f in self.faults):
            trainer.objective = _ScaledLoss(trainer.objective, lambda: self._loss_factor(trainer))
        slow = [f for f in self.faults if f.kind == "slow" and f.rank in (None, trainer.ctx.rank)]
        if slow:
            _slow_down(
                trainer.engine.module,
                lambda: sum(f.delay_ms for f in slow if trainer.step + 1 >= f.step) / 1000,
            )

    def _loss_factor(self, trainer) -> float | None:
        if not trainer.engine.training:
            return None
        if self._fired(trainer, "nan", "step", trainer.step + 1):
            return float("nan")
        step, rank = trainer.step + 1, trainer.ctx.rank
        return next(
            (f.factor for f in self.faults if f.kind == "spike" and f.fires("step", step, rank)), None
        )

    def on_step_end(self, trainer) -> None:
        if self._fired(trainer, "kill", "step", trainer.step):
            os.kill(os.getpid(), signal.SIGKILL)
        if self._fired(trainer, "hang", "step", trainer.step):
            signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the launcher may still end it
            while True:
                time.sleep(3600)

    def on_checkpoint_written(self, trainer, directory: Path, step: int) -> None:
        if self._fired(trainer, "kill", "save", step):
            os.kill(os.getpid(), signal.SIGKILL)
        if self._fired(trainer, "enospc", "save", step):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory))
