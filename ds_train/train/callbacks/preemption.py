"""Catch SIGUSR1/SIGTERM (Slurm's warning before a time limit or preemption) and ask the trainer
to checkpoint and stop at the next step boundary. The ranks agree through the flag the trainer
all-reduces with each step's token count, so no extra collective is spent on it."""

from __future__ import annotations

import logging
import signal

from ds_train.train.callbacks.base import Callback

log = logging.getLogger(__name__)


class PreemptionHandler(Callback):
    """Installed at the very start of a run (`install`), so a signal that arrives while the model
    loads is not fatal: it is held and passed on to the trainer when training starts, which then
    checkpoints and exits for requeue at its first step boundary."""

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

    def __init__(self):
        self._previous: dict = {}
        self._trainer = None
        self.pending: str | None = None  # a signal received before the trainer existed

    def install(self) -> PreemptionHandler:
        """Take over SIGUSR1/SIGTERM. A handler installed earlier in the process (the CLI's, before
        the seconds of importing torch and DeepSpeed, in which a signal would kill the rank and
        leave its peers waiting for it at the rendezvous) hands over the signal it holds."""
        for sig in self.SIGNALS:
            previous = signal.signal(sig, self._handle)
            earlier = getattr(previous, "__self__", None)
            if isinstance(earlier, PreemptionHandler) and earlier is not self:
                self.pending = self.pending or earlier.pending
                previous = earlier._previous.get(sig, signal.SIG_DFL)
            self._previous.setdefault(sig, previous)
        return self

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        log.warning("received %s: will checkpoint and stop after the current step", name)
        if self._trainer is None:
            self.pending = name
        else:
            self._trainer.request_stop(reason=name)

    def on_train_start(self, trainer) -> None:
        self.install()
        self._trainer = trainer
        if self.pending is not None:
            trainer.request_stop(reason=self.pending)

    def on_train_end(self, trainer) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)
        self._previous.clear()
        self._trainer = None
