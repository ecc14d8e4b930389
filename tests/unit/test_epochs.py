"""train.epochs: a run length in passes over the data, resolved into train.max_steps by the
preflight (pretraining from the shard manifests, fine-tuning from the tokenized train split)."""

from __future__ import annotations

import math

import pytest

from ds_train.config import ConfigError, dump_yaml, load_config, validate
from ds_train.data.loader import load_shard_sets
from tests.helpers import base_config, read_metrics, run_cli, write_config


def _cfg(tmp_path, shards, **train):
    raw = base_config(tmp_path / "run", shards, train=train)
    if "max_steps" not in train:
        del raw["train"]["max_steps"]
    return write_config(tmp_path / "run.yaml", raw)


def test_one_of_max_steps_and_epochs(tmp_path, shards):
    with pytest.raises(
        ConfigError, match=r"set one of train.max_steps \(6\) and train.epochs \(2.0\), not both"
    ):
        validate(load_config(_cfg(tmp_path, shards, max_steps=6, epochs=2)))
    with pytest.raises(ConfigError, match=r"missing required key 'train.max_steps' \(or train.epochs\)"):
        validate(load_config(_cfg(tmp_path, shards)))
    for bad in (0, -1):
        with pytest.raises(ConfigError, match="train.epochs must be a number > 0"):
            validate(load_config(_cfg(tmp_path, shards, epochs=bad)))
    # a config setting max_steps takes epochs from the command line once max_steps is unset
    cfg = load_config(_cfg(tmp_path, shards, max_steps=6), ["train.max_steps=null", "train.epochs=1"])
    validate(cfg)
    assert cfg.train.max_steps is None and cfg.train.epochs == 1


def test_pretraining_epochs_become_steps_over_the_shard_rows(tmp_path, shards):
    from ds_train.train import pretrain

    rows = sum(s.num_rows for s in load_shard_sets(str(shards / "train")))
    cfg = load_config(_cfg(tmp_path, shards, epochs=0.25, global_batch_size=8))
    pre = pretrain.check(cfg)
    assert cfg.train.max_steps == math.ceil(0.25 * rows / 8) and pre.layout.global_batch_size == 8
    pretrain.preflight(cfg)  # again (a start re-checks after waiting for the run directory's lock)
    assert cfg.train.max_steps == math.ceil(0.25 * rows / 8)
    # the config.yaml a run writes loads back (it held both keys, then refused: review)
    saved = tmp_path / "saved.yaml"
    saved.write_text(dump_yaml(cfg))
    again = load_config(saved)
    assert (again.train.max_steps, again.train.epochs) == (None, 0.25)
    assert pretrain.check(again) and again.train.max_steps == cfg.train.max_steps
    # a profile window is checked against the resolved length
    cfg = load_config(_cfg(tmp_path, shards, epochs=0.01, global_batch_size=8), ["profile.start_step=50"])
    expected = math.ceil(0.01 * rows / 8)
    with pytest.raises(
        ConfigError, match=rf"profile window steps 50-\d+ must end before train.max_steps={expected} "
    ):
        pretrain.check(cfg)


@pytest.mark.slow
def test_an_epochs_run_trains_its_steps_and_then_is_finished(tmp_path, shards):
    rows = sum(s.num_rows for s in load_shard_sets(str(shards / "train")))
    cfg_file = _cfg(tmp_path, shards, epochs=0.1, global_batch_size=8, log_every=1)
    steps = math.ceil(0.1 * rows / 8)
    proc = run_cli(["pretrain", cfg_file])
    assert [r["step"] for r in read_metrics(tmp_path / "run") if "loss" in r][-1] == steps
    again = run_cli(["pretrain", cfg_file])  # the same command: finished, nothing to train
    assert [r["step"] for r in read_metrics(tmp_path / "run") if "loss" in r][-1] == steps
    assert f"max_steps {steps} (train.epochs=0.1)" in proc.stderr  # the start's banner says it
    assert f"resuming at step {steps}" in again.stderr  # the same length, re-resolved: no further step
