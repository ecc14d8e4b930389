"""The W&B sink: offline unless asked, one W&B run per run directory across attempts (wandb itself
is not installed here: a stand-in module records what ds_train asks of it)."""

from __future__ import annotations

import sys
import types

import pytest

from ds_train.train.callbacks.trackers import WandB, wandb_callback


@pytest.fixture
def wandb_inits(monkeypatch):
    """Each `wandb.init` call's keyword arguments."""
    calls: list[dict] = []
    fake = types.ModuleType("wandb")
    # no wandb.util.generate_id: current wandb releases dropped it, and a run id drawn with it
    # made W&B fail to start (a warning, then nothing tracked)
    fake.init = lambda **kw: calls.append(kw) or types.SimpleNamespace(**kw)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    return calls


def test_wandb_is_offline_unless_wandb_mode_says_otherwise(tmp_path, wandb_inits, monkeypatch):
    assert isinstance(wandb_callback("r", None, {}, tmp_path), WandB)
    assert wandb_inits[-1]["mode"] == "offline"
    monkeypatch.setenv("WANDB_MODE", "online")
    wandb_callback("r", None, {}, tmp_path)
    assert wandb_inits[-1]["mode"] is None  # wandb reads WANDB_MODE itself


def test_each_run_directory_keeps_one_wandb_run_across_attempts(tmp_path, wandb_inits):
    first, other = tmp_path / "a" / "pretrain", tmp_path / "b" / "pretrain"  # the same basename
    for d in (first, other, first):  # `first` again: a requeued attempt
        d.mkdir(parents=True, exist_ok=True)
        wandb_callback("pretrain", "p", {}, d)
    ids = [kw["id"] for kw in wandb_inits]
    assert ids[0] != ids[1] and ids[2] == ids[0]
    assert all(len(i) == 8 and i.isalnum() and i == i.lower() for i in ids)  # W&B's id format
    assert all(kw["resume"] == "allow" for kw in wandb_inits)


def test_wandb_failing_to_start_does_not_stop_the_run(tmp_path, wandb_inits, monkeypatch, caplog):
    def refuse(**kw):
        raise RuntimeError("no credentials")

    monkeypatch.setattr(sys.modules["wandb"], "init", refuse)
    assert wandb_callback("r", None, {}, tmp_path) is None
    assert "Weights & Biases disabled: no credentials" in caplog.text


def test_tensorboard_purges_what_an_interrupted_attempt_wrote_after_the_checkpoint(tmp_path):
    """A resumed attempt re-logs steps the interrupted one logged after its checkpoint: it opens
    its event file with TensorBoard's purge marker (a SessionLog START at the first step it logs),
    so readers drop the earlier attempt's points from there on instead of folding the curves back."""
    import time

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.compat.proto.event_pb2 import SessionLog

    from ds_train.train.callbacks.trackers import TensorBoard

    def attempt(start, steps, loss):
        tb = TensorBoard(tmp_path)
        tb.on_train_start(types.SimpleNamespace(step=start))
        for step in steps:
            tb.on_log(None, {"step": step, "loss": loss})
        tb.on_train_end(None)

    attempt(0, range(1, 16), 1.0)  # killed after step 15, its checkpoint at step 10
    time.sleep(1.1)  # event files are named by the second they were opened
    attempt(10, range(11, 21), 2.0)
    first, resumed = sorted((tmp_path / "tensorboard").iterdir())
    markers = [
        e.step for e in EventFileLoader(str(resumed)).Load() if e.session_log.status == SessionLog.START
    ]
    # a fresh start marks step 1 too: a first attempt that crashed before any checkpoint is purged
    assert markers == [11] and [
        e.step for e in EventFileLoader(str(first)).Load() if e.HasField("session_log")
    ] == [1]
    events = EventAccumulator(str(tmp_path / "tensorboard")).Reload().Scalars("train/loss")
    assert [e.step for e in events] == list(range(1, 21))  # each step once
    assert [e.value for e in events if e.step > 10] == [2.0] * 10  # the resumed attempt's


def test_per_layer_norms_become_one_scalar_per_layer():
    from ds_train.train.callbacks.trackers import _scalars

    record = {
        "step": 4,
        "loss": 2.0,
        "ok": True,
        "layer_grad_norm": {"model.layers.0": 0.5, "lm_head": 1},
        "host": "n1",
    }
    assert _scalars(record) == {
        "loss": 2.0,
        "layer_grad_norm/model.layers.0": 0.5,
        "layer_grad_norm/lm_head": 1.0,
    }
