"""Kill-and-resume equals uninterrupted, step for step (same world size)."""

from __future__ import annotations

import pytest

from ds_train.checkpoint.layout import latest_checkpoint
from ds_train.report.goodput import goodput
from tests.helpers import base_config, read_metrics, torchrun, train_losses, write_config

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


@pytest.mark.parametrize("stage", [3])
def test_killed_run_resumes_exactly(tmp_path, shards, stage):
    train = {"max_steps": 10, "save_every": 4, "lr": 5e-3}
    data = {"num_workers": 1, "valid": str(shards / "valid")}
    straight = write_config(
        tmp_path / "a.yaml",
        base_config(tmp_path / "a", shards, train=train, data=data, zero={"stage": stage}),
    )
    torchrun(["pretrain", straight])

    resumed_dir = tmp_path / "b"
    resumed = write_config(
        tmp_path / "b.yaml", base_config(resumed_dir, shards, train=train, data=data, zero={"stage": stage})
    )
    killed = torchrun(["pretrain", resumed], env={"DS_TRAIN_FAULT": "kill@step=6"}, check=False)
    assert killed.returncode != 0
    assert (
        latest_checkpoint(resumed_dir / "checkpoints").step == 4
    )  # the kill came after step 6, before a save
    torchrun(["pretrain", resumed])  # the same command again: resumes from step 4

    steps = [r["step"] for r in read_metrics(resumed_dir) if "loss" in r]
    # killed at the end of step 6 (before its log line): steps 5 and 6 are redone after the resume
    assert steps == [1, 2, 3, 4, 5, 5, 6, 7, 8, 9, 10]
    # goodput: the killed attempt's step 5 is work lost (step 6 never reached its log line)
    records = read_metrics(resumed_dir)
    lost = next(r for r in records if r.get("step") == 5 and "loss" in r)
    run_time = goodput(records)
    assert run_time.attempts == 2 and run_time.redone_s == pytest.approx(lost["step_time_s"])
    assert goodput(read_metrics(tmp_path / "a")).redone_s == 0
    a, b = train_losses(tmp_path / "a"), train_losses(resumed_dir)
    for step in range(1, 11):
        assert b[step] == pytest.approx(a[step], rel=1e-6, abs=0), f"step {step}: {b[step]} vs {a[step]}"
    valid_a = [r for r in read_metrics(tmp_path / "a") if "valid_loss" in r][-1]["valid_loss"]
    valid_b = [r for r in read_metrics(resumed_dir) if "valid_loss" in r][-1]["valid_loss"]
    assert valid_b == pytest.approx(valid_a, rel=1e-6)
