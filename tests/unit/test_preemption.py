"""SIGUSR1/SIGTERM before training starts is held and handed to the trainer, not fatal; Ctrl-C
while training checkpoints first, and a second Ctrl-C stops at once."""

from __future__ import annotations

import os
import signal

import pytest

from ds_train.train.callbacks.base import Callback
from ds_train.train.callbacks.preemption import PreemptionHandler
from ds_train.train.trainer import INTERRUPTED_EXIT_CODE


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


def test_ctrl_c_while_training_asks_for_a_checkpoint_and_a_second_one_stops_at_once():
    before = signal.getsignal(signal.SIGINT)
    handler = PreemptionHandler().install()
    trainer = FakeTrainer()
    handler.on_train_start(trainer)
    os.kill(os.getpid(), signal.SIGINT)
    assert trainer.stops == ["SIGINT"]
    assert signal.getsignal(signal.SIGINT) is before  # Python's again: the next Ctrl-C is immediate
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)
    handler.on_train_end(trainer)
    assert signal.getsignal(signal.SIGINT) is before


class _CtrlC(Callback):
    def __init__(self, at: int, presses: int):
        self.at, self.presses = at, presses

    def on_step_end(self, trainer):
        if trainer.step == self.at:
            for _ in range(self.presses):
                os.kill(os.getpid(), signal.SIGINT)


def test_the_trainer_checkpoints_on_ctrl_c_and_exits_130():
    from tests.unit.stand_in_trainer import stand_in_trainer

    saved = []
    trainer = stand_in_trainer(
        [PreemptionHandler(), _CtrlC(at=3, presses=1)], save=lambda engine, step, *a, **k: saved.append(step)
    )
    assert trainer.fit() == INTERRUPTED_EXIT_CODE == 130
    assert saved == [3] and trainer.step == 3  # the steps since the last checkpoint are kept
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_second_ctrl_c_stops_at_once_and_says_where_to_resume(caplog):
    from tests.unit.stand_in_trainer import stand_in_trainer

    trainer = stand_in_trainer([PreemptionHandler(), _CtrlC(at=3, presses=2)])
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    assert (
        "interrupted at step 3; there is no checkpoint yet; re-run the same command to resume" in caplog.text
    )
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.slow
def test_ctrl_c_at_a_terminal_checkpoints_a_plain_run(tmp_path, shards):
    """Ctrl-C reaches the rank and its DataLoader worker (the terminal's whole foreground group):
    the run used to exit 130 at once, silently, losing the steps since its last checkpoint."""
    import subprocess
    import sys
    import time

    from tests.helpers import REPO, base_config, clean_env, read_metrics, write_config

    run_dir = tmp_path / "run"
    cfg = base_config(run_dir, shards, train={"max_steps": 100_000, "save_every": 5}, data={"num_workers": 1})
    proc = subprocess.Popen(
        [sys.executable, "-m", "ds_train", "pretrain", str(write_config(tmp_path / "run.yaml", cfg))],
        cwd=REPO,
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # a process group of its own, as a terminal's foreground job
    )
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if (run_dir / "metrics.jsonl").exists() and len(read_metrics(run_dir)) >= 7:
            break
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 130, out[-3000:]
    stopped = max(r["step"] for r in read_metrics(run_dir) if "loss" in r)
    assert stopped > 5 and (run_dir / "checkpoints" / f"step_{stopped:08d}").is_dir(), out[-3000:]
    assert f"interrupted at step {stopped} after checkpointing it; re-run the same command to resume" in out
    assert "Traceback" not in out
