"""The W&B sink: offline unless asked, one W&B run per run directory across attempts (wandb itself
is not installed here: a stand-in module records what ds_train asks of it)."""

from __future__ import annotations

import itertools
import sys
import types

import pytest

from ds_train.train.callbacks.trackers import WandB, wandb_callback


@pytest.fixture
def wandb_inits(monkeypatch):
    """Each `wandb.init` call's keyword arguments."""
    calls: list[dict] = []
    ids = itertools.count()
    fake = types.ModuleType("wandb")
    fake.util = types.SimpleNamespace(generate_id=lambda: f"id{next(ids)}")
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
    assert all(kw["resume"] == "allow" for kw in wandb_inits)


def test_wandb_failing_to_start_does_not_stop_the_run(tmp_path, wandb_inits, monkeypatch, caplog):
    def refuse(**kw):
        raise RuntimeError("no credentials")

    monkeypatch.setattr(sys.modules["wandb"], "init", refuse)
    assert wandb_callback("r", None, {}, tmp_path) is None
    assert "Weights & Biases disabled: no credentials" in caplog.text
