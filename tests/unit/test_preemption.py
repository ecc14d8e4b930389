"""SIGUSR1/SIGTERM before training starts is held and handed to the trainer, not fatal."""

from __future__ import annotations

import os
import signal

from ds_train.train.callbacks.preemption import PreemptionHandler


class FakeTrainer:
    def __init__(self):
        self.stops: list[str] = []

    def request_stop(self, reason: str) -> None:
        self.stops.append(reason)


def test_a_signal_during_start_up_stops_the_trainer_at_its_first_step():
    before = signal.getsignal(signal.SIGUSR1)
    handler = PreemptionHandler().install()
    os.kill(os.getpid(), signal.SIGUSR1)  # the default action would end this process
    assert handler.pending == "SIGUSR1"
    trainer = FakeTrainer()
    handler.on_train_start(trainer)
    assert trainer.stops == ["SIGUSR1"]
    os.kill(os.getpid(), signal.SIGTERM)  # while training: straight to the trainer
    assert trainer.stops == ["SIGUSR1", "SIGTERM"]
    handler.on_train_end(trainer)
    assert signal.getsignal(signal.SIGUSR1) is before  # the previous handlers are back


def test_no_signal_no_stop():
    handler = PreemptionHandler().install()
    trainer = FakeTrainer()
    handler.on_train_start(trainer)
    handler.on_train_end(trainer)
    assert trainer.stops == [] and handler.pending is None
