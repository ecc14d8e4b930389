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


def test_an_earlier_handler_hands_over_its_signal_and_the_original_handler():
    before = signal.getsignal(signal.SIGUSR1)
    early = PreemptionHandler().install()  # the CLI's, before torch is imported
    os.kill(os.getpid(), signal.SIGTERM)
    handler = PreemptionHandler().install()  # the run's
    assert handler.pending == "SIGTERM"
    trainer = FakeTrainer()
    handler.on_train_start(trainer)
    assert trainer.stops == ["SIGTERM"] and early.pending == "SIGTERM"
    handler.on_train_end(trainer)
    assert signal.getsignal(signal.SIGUSR1) is before  # not the early handler


def test_a_signal_while_torch_and_deepspeed_are_imported_is_held(tmp_path, shards):
    """A rank signalled in the seconds its imports take used to die of SIGUSR1 (its peers then
    waited for it at the rendezvous until the collective timeout). Here the signal arrives where
    those imports begin; the process goes on, holding it."""
    import subprocess
    import sys

    from tests.helpers import REPO, base_config, write_config

    cfg = write_config(tmp_path / "run.yaml", base_config(tmp_path / "run", shards))
    script = f"""
import os, signal
import ds_train.distributed.engine as engine
real, held = engine.quiet_deepspeed, []
def quiet_deepspeed():
    os.kill(os.getpid(), signal.SIGUSR1)
    held.append(signal.getsignal(signal.SIGUSR1).__self__.pending)
    real()
engine.quiet_deepspeed = quiet_deepspeed
from ds_train.cli import main
code = main(["pretrain", {str(cfg)!r}, "--check"])
restored = signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL
print("exit", code, "holding", *held, "restored", restored)
"""
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "exit 0 holding SIGUSR1 restored True" in proc.stdout  # main puts the handlers back
