"""Catch SIGUSR1/SIGTERM (Slurm's warning before a time limit or preemption) and ask the trainer
to checkpoint and stop at the next step boundary. The ranks agree through the flag the trainer
all-reduces with each step's token count, so no extra collective is spent on it.

Ctrl-C (SIGINT) while training does the same, so an interactive run keeps the steps since its
last checkpoint, and exits 130; the first Ctrl-C gives SIGINT back to Python, so a second one
stops at once (KeyboardInterrupt), with a line naming the step reached and the checkpoint a
re-run resumes from. Before training starts Ctrl-C stops at once: there is nothing to save."""

from __future__ import annotations

import logging
import os
import signal
import threading

from ds_train.train.callbacks.base import Callback

log = logging.getLogger(__name__)


class PreemptionHandler(Callback):
    """Installed at the very start of a run (`install`), so a signal that arrives while the model
    loads is not fatal: it is held and passed on to the trainer when training starts, which then
    checkpoints and exits for requeue at its first step boundary."""

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

    def __init__(self):
        self._previous: dict = {}
        self._previous_int = None  # SIGINT's handler before training started; None: not taken
        self._sigint_pid: int | None = None  # the process that took SIGINT (not its forked workers)
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

    def _interrupt(self, signum, frame) -> None:
        """The first Ctrl-C while training: checkpoint at the step boundary; the next one is Python's."""
        if os.getpid() != self._sigint_pid:
            return  # a forked DataLoader worker (a terminal signals the whole group): the rank decides
        self._release_sigint()
        log.warning(
            "Ctrl-C: will checkpoint and stop after the current step (press Ctrl-C again to stop "
            "at once, losing the steps since the last checkpoint)"
        )
        if self._trainer is not None:
            self._trainer.request_stop(reason="SIGINT")

    def _take_sigint(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # only the main thread may set handlers (tests driving a trainer elsewhere)
        current = signal.getsignal(signal.SIGINT)
        if current is not signal.default_int_handler:
            return  # ignored (a background job) or someone else's: leave it
        self._sigint_pid = os.getpid()
        self._previous_int = signal.signal(signal.SIGINT, self._interrupt)

    def _release_sigint(self) -> None:
        if self._previous_int is not None:
            signal.signal(signal.SIGINT, self._previous_int)
            self._previous_int = None

    def on_train_start(self, trainer) -> None:
        self.install()
        self._take_sigint()
        self._trainer = trainer
        if self.pending is not None:
            trainer.request_stop(reason=self.pending)

    def on_train_end(self, trainer) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)
        self._previous.clear()
        self._release_sigint()
        self._trainer = None

    def on_train_error(self, trainer, error: BaseException) -> None:
        self._release_sigint()
        if isinstance(error, KeyboardInterrupt) and trainer.ctx.is_main:
            from ds_train.checkpoint.layout import latest_checkpoint

            latest = latest_checkpoint(trainer.checkpoints.root)
            saved = f"the latest checkpoint is step {latest.step}" if latest else "there is no checkpoint yet"
            log.warning("interrupted at step %d; %s; re-run the same command to resume", trainer.step, saved)
