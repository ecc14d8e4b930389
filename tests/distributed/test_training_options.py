"""Training options that must not change the maths (activation checkpointing, compiled blocks), that
change it only by rounding (bf16), and the run directory's bookkeeping (keep_last, eval, metrics,
TensorBoard)."""

from __future__ import annotations

import math

import pytest

from ds_train.checkpoint.layout import complete_checkpoints
from tests.helpers import base_config, read_metrics, run_cli, torchrun, train_losses, write_config

pytestmark = [pytest.mark.slow]


def _train(tmp_path, shards, name, **sections):
    run = tmp_path / name
    run_cli(["pretrain", write_config(tmp_path / f"{name}.yaml", base_config(run, shards, **sections))])
    return run


def test_activation_checkpointing_is_exact_and_bf16_is_close(tmp_path, shards):
    train = {"max_steps": 4, "lr": 5e-3}
    plain = train_losses(_train(tmp_path, shards, "plain", train=train))
    ckpt = train_losses(
        _train(tmp_path, shards, "actckpt", train=train, model={"activation_checkpointing": True})
    )
    bf16 = train_losses(_train(tmp_path, shards, "bf16", train={**train, "precision": "bf16"}))
    # train.grad_dtype=fp32 (pretraining audit): gradients summed over 4 micro-batches in fp32
    fp32_grads = train_losses(
        _train(
            tmp_path, shards, "bf16-fp32-grads", train={**train, "precision": "bf16", "grad_dtype": "fp32"}
        )
    )
    for step in plain:
        assert ckpt[step] == pytest.approx(plain[step], rel=1e-5)
        assert bf16[step] == pytest.approx(plain[step], rel=2e-2)
        assert fp32_grads[step] == pytest.approx(plain[step], rel=2e-2)
    assert fp32_grads[1] == bf16[1] and fp32_grads != bf16  # the same first forward; other updates


def test_compiled_blocks_train_like_eager_and_resume_without_compile(tmp_path, shards):
    """model.compile on 2 ranks at ZeRO-2, with the first block checkpointed and evals (no-grad
    recompiles), compiles every block without a graph break and gives the eager run's losses (the
    model has no dropout: inductor draws its own dropout masks); killed after step 5, its step-4
    checkpoint resumes without compile (parameter names unchanged) onto the same losses."""
    common = {
        "train": {"max_steps": 6, "eval_every": 2, "save_every": 2},
        "data": {"valid": str(shards / "valid")},
    }
    want = read_metrics(_train(tmp_path, shards, "eager", **common))
    run = tmp_path / "compiled"
    model = {"compile": True, "activation_checkpointing": True, "activation_checkpointing_layers": 1}
    cfg = base_config(run, shards, model=model, zero={"stage": 2}, **common)
    killed = torchrun(
        ["pretrain", write_config(tmp_path / "compiled.yaml", cfg)],
        env={"TORCH_LOGS": "dynamo,graph_breaks", "DS_TRAIN_FAULT": "kill@step=5"},
        check=False,
    )
    assert killed.returncode != 0 and "torchdynamo done tracing forward" in killed.stderr  # compiled
    # ...whole, in every situation: no block fell back to eager in part or in a new situation
    assert "Graph break" not in killed.stderr and "recompile_limit" not in killed.stderr
    assert 4 in train_losses(run)  # killed after step 5: resumed from the step-4 checkpoint
    cfg["model"]["compile"] = False
    torchrun(["pretrain", write_config(tmp_path / "resumed.yaml", cfg)])
    losses = {r["step"]: r["loss"] for r in want if "loss" in r}
    assert sorted(train_losses(run)) == sorted(losses)  # steps 1-4 compiled, 5-6 resumed eager
    for step, loss in train_losses(run).items():
        assert loss == pytest.approx(losses[step], rel=1e-5), step
    valid = {r["step"]: r["valid_loss"] for r in want if "valid_loss" in r}
    evals = [r for r in read_metrics(run) if "valid_loss" in r]
    assert {r["step"] for r in evals} == set(valid)
    for r in evals:
        assert r["valid_loss"] == pytest.approx(valid[r["step"]], rel=1e-5)


def test_run_dir_bookkeeping(tmp_path, shards):
    run = _train(
        tmp_path,
        shards,
        "books",
        run={"tensorboard": True},
        data={"valid": str(shards / "valid")},
        train={"max_steps": 6, "save_every": 2, "keep_last": 2, "eval_every": 3, "log_every": 2},
    )
    assert [c.step for c in complete_checkpoints(run / "checkpoints")] == [4, 6]  # keep_last=2 pruned step 2
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000006"
    records = read_metrics(run)
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == [2, 4, 6]
    for key in ("step", "loss", "lr", "tokens", "tokens_per_s", "mfu", "grad_norm"):
        assert key in train[0]
    for r in train:  # the loader stall, a share of the same interval's step time
        assert 0 <= r["data_wait_s"] <= r["step_time_s"] and 0 <= r["data_wait_frac"] <= 1
    assert train[-1]["tokens"] == 6 * 8 * 32  # steps × global batch × seq_len
    evals = [r for r in records if "valid_loss" in r]
    assert [r["step"] for r in evals] == [3, 6]
    assert evals[-1]["valid_ppl"] == pytest.approx(math.exp(evals[-1]["valid_loss"]))
    assert any((run / "tensorboard").iterdir())
    assert (run / "config.yaml").read_text() == (
        run / "checkpoints" / "step_00000006" / "config.yaml"
    ).read_text()
