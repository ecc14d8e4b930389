"""train.batch_ramp end to end: a ramped run on 2 ranks trains, step for step, what plain runs
with those global batches train (DeepSpeed configured for each; their data stream carried over
by forced resumes), what 1 rank with twice the accumulation trains, and what a run killed mid-ramp
and resumed trains."""

from __future__ import annotations

import json

import pytest

from tests.helpers import base_config, read_metrics, run_cli, torchrun, train_losses, write_config

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

RAMP = [[3, 4], [5, 8]]  # steps 1-3 take 4 sequences, 4-5 take 8, then 16
TRAIN = {
    "max_steps": 7,
    "global_batch_size": 16,
    "batch_ramp": RAMP,
    "schedule": "constant",  # plain runs of 3, 5 and 7 steps then share the ramped run's rates
    "lr": 5e-3,
    "save_every": 2,
}


def _config(tmp_path, name: str, shards, **train) -> tuple:
    cfg = base_config(tmp_path / name, shards, train={**TRAIN, **train})
    return write_config(tmp_path / f"{name}.yaml", cfg), tmp_path / name


def test_a_ramped_run_trains_what_plain_runs_of_each_batch_train(tmp_path, shards):
    ramped, ramped_dir = _config(tmp_path, "ramped", shards)
    torchrun(["pretrain", ramped])
    losses = train_losses(ramped_dir)
    records = {r["step"]: r for r in read_metrics(ramped_dir) if "loss" in r}
    assert [records[s]["samples"] for s in (1, 3, 4, 5, 6, 7)] == [4, 12, 20, 28, 44, 60]
    assert records[7]["tokens"] == 60 * 32
    assert [records[s]["global_batch_size"] for s in range(1, 8)] == [4, 4, 4, 8, 8, 16, 16]
    state = json.loads((ramped_dir / "checkpoints" / "step_00000004" / "ds_train_state.json").read_text())
    assert state["batch_ramp"] == RAMP and state["data"]["consumed_samples"] == 20

    # The same stream and steps without a ramp: 3 steps of 4, then 2 of 8, then 2 of 16, each a
    # plain DeepSpeed configuration, the later ones resumed with run.force_resume (the stream
    # continues at the checkpoint's position). No ramp: the trainer never sets the boundary.
    plain_dir = tmp_path / "plain"
    for steps, batch in ((3, 4), (5, 8), (7, 16)):
        plain = {**TRAIN, "max_steps": steps, "global_batch_size": batch, "batch_ramp": [], "save_every": 0}
        raw = base_config(plain_dir, shards, train=plain, run={"force_resume": steps > 3})
        torchrun(["pretrain", write_config(tmp_path / "plain.yaml", raw)])
    plain = train_losses(plain_dir)
    assert sorted(plain) == list(range(1, 8))
    for step in range(1, 8):
        assert losses[step] == pytest.approx(plain[step], rel=1e-5), (
            f"step {step}: {losses[step]} vs {plain[step]}"
        )
    assert losses[7] < losses[1] - 0.1

    # the other ZeRO stages, and ZeRO-2 with its CPU optimizer (it accumulates gradients in host
    # memory when DeepSpeed is configured for more than one micro-batch a step)
    for name, overrides in (("zero1", ["zero.stage=1"]), ("zero3", ["zero.stage=3"]),
                            ("offload", ["zero.offload_optimizer=cpu"])):  # fmt: skip
        cfg, run_dir = _config(tmp_path, name, shards)
        torchrun(["pretrain", cfg, *overrides])
        other = train_losses(run_dir)
        for step in range(1, 8):
            assert other[step] == pytest.approx(losses[step], rel=1e-4), f"{name} step {step}"

    # 1 rank at ZeRO-0: every stage accumulates twice as many micro-batches
    single, single_dir = _config(tmp_path, "single", shards)
    run_cli(["pretrain", single, "zero.stage=0"])
    one_rank = train_losses(single_dir)
    for step in range(1, 8):
        assert one_rank[step] == pytest.approx(losses[step], rel=1e-4), f"step {step}"

    # killed after step 5 (mid-ramp, its last checkpoint at step 4): the resumed run is the same
    killed, killed_dir = _config(tmp_path, "killed", shards)
    assert torchrun(["pretrain", killed], env={"DS_TRAIN_FAULT": "kill@step=5"}, check=False).returncode != 0
    torchrun(["pretrain", killed])
    resumed = train_losses(killed_dir)
    for step in range(1, 8):
        assert resumed[step] == pytest.approx(losses[step], rel=1e-6), f"step {step}"

    # `ds-train data order` shows each step's batch
    order = run_cli(["data", "order", ramped, "--steps", 7, "--json"]).stdout.splitlines()
    assert [len(json.loads(line)["samples"]) for line in order] == [4, 4, 4, 8, 8, 16, 16]
