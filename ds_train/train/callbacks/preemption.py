"""Catch SIGUSR1/SIGTERM (Slurm's warning before a time limit or preemption) and ask the trainer
to checkpoint and stop at the next step boundary. The ranks agree through the flag the trainer
all-reduces with each step's token count, so no extra collective is spent on it."""

from __future__ import annotations

import logging
import signal

from ds_train.train.callbacks.base import Callback

log = logging.getLogger(__name__)


class PreemptionHandler(Callback):
    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

    def __init__(self):
        self._previous = {}

    def on_train_start(self, trainer) -> None:
        def handler(signum, frame):
            log.warning(
                "received %s: will checkpoint and stop after the current step", signal.Signals(signum).name
            )
            trainer.request_stop(reason=signal.Signals(signum).name)

        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, handler)

    def on_train_end(self, trainer) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)
