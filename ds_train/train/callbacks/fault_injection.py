"""Fault injection for reliability tests, armed only by the DS_TRAIN_FAULT environment variable.

    DS_TRAIN_FAULT="kill@step=7"          SIGKILL every rank right after step 7
    DS_TRAIN_FAULT="kill@step=7,rank=1"   SIGKILL only rank 1 (the others must not hang)

The callback is not installed at all when the variable is unset.
"""

from __future__ import annotations

import os
import signal

from ds_train.train.callbacks.base import Callback

ENV = "DS_TRAIN_FAULT"


class FaultInjection(Callback):
    def __init__(self, kind: str, step: int, rank: int | None):
        self.kind, self.step, self.rank = kind, step, rank

    @classmethod
    def from_env(cls) -> FaultInjection | None:
        spec = os.environ.get(ENV)
        if not spec:
            return None
        kind, _, params = spec.partition("@")
        values = dict(p.split("=", 1) for p in params.split(",") if "=" in p)
        return cls(kind, int(values["step"]), int(values["rank"]) if "rank" in values else None)

    def _armed(self, trainer) -> bool:
        return trainer.step == self.step and self.rank in (None, trainer.ctx.rank)

    def on_step_end(self, trainer) -> None:
        if self.kind == "kill" and self._armed(trainer):
            os.kill(os.getpid(), signal.SIGKILL)
