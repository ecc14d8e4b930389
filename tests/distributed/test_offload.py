"""Offload end to end on 2 ranks, through the shipped presets: ZeRO-2 with the optimizer on the CPU
(ZeRO-Offload), ZeRO-3 with optimizer and parameters on the CPU, and ZeRO-3 with both on NVMe
(ZeRO-Infinity). Each trains to the on-device run's losses (DeepSpeed's CPU Adam against torch's
AdamW), is killed mid-run and resumes from a checkpoint saved in the background, and converts to
the same Hugging Face weights. Unit tests only see the JSON; these see DeepSpeed swap."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from ds_train.checkpoint.layout import complete_checkpoints
from ds_train.distributed.op_builds import offload_op_problem
from tests.helpers import REPO, base_config, run_cli, torchrun, train_losses, write_config

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

TRAIN = {"max_steps": 6, "lr": 1e-2, "save_every": 2}
# 1.8 M parameters: each rank's share of the weight-decayed group (3.5 MB of fp32) is over DeepSpeed's
# 1 MiB swap threshold and goes to NVMe, the norms' group stays in memory; resuming must restore both
MODEL = {"config": str(REPO / "configs" / "model" / "tiny-llama.json")}
# Stage 3 keeps parameters under stage3_param_persistence_threshold elements whole on every rank,
# which is most of the micro model: at 0 every parameter is partitioned, and offloaded.
ALL_PARTITIONED = {"stage3_param_persistence_threshold": 0}
# (the stage is repeated: base_config sets zero.stage=2, which would win over the preset's)
OFFLOADS = {
    "zero2-optimizer-cpu": {"preset": "stage2-offload-optimizer", "stage": 2},
    "zero3-all-cpu": {"preset": "stage3-offload-all", "stage": 3, **ALL_PARTITIONED},
    # the preset's threshold: the small matrices stay whole on every rank, and a resume re-gathers them
    "zero3-nvme": {"preset": "stage3-nvme", "stage": 3},
}
STARTUP = {  # what the start-up line says of each
    "zero2-optimizer-cpu": "ZeRO-2 (optimizer on cpu)",
    "zero3-all-cpu": "ZeRO-3 (optimizer on cpu, parameters on cpu)",
    "zero3-nvme": "ZeRO-3 (optimizer on nvme, parameters on nvme)",
}


def _hf_tensors(run: Path, out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    assert "verified" in run_cli(["convert", "to-hf", run, out, "--verify"]).stdout
    return {k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


@pytest.fixture(scope="module")
def on_device(tmp_path_factory, shards):
    """The same run without offload (ZeRO-2): its losses and converted weights."""
    tmp = tmp_path_factory.mktemp("on_device")
    run = tmp / "run"
    torchrun(["pretrain", write_config(tmp / "run.yaml", base_config(run, shards, train=TRAIN, model=MODEL))])
    return train_losses(run), _hf_tensors(run, tmp / "hf")


@pytest.mark.parametrize("name", list(OFFLOADS))
def test_offload_trains_resumes_and_converts_like_on_device(tmp_path, shards, on_device, name):
    zero = dict(OFFLOADS[name])
    if name.endswith("nvme"):
        if problem := offload_op_problem("nvme", "nvme"):
            if os.environ.get("DS_TRAIN_REQUIRE_LIBAIO") == "1":
                pytest.fail(f"{problem} (DS_TRAIN_REQUIRE_LIBAIO=1)", pytrace=False)
            pytest.skip(problem)
        zero["nvme_path"] = str(tmp_path / "nvme")
        (tmp_path / "nvme").mkdir()
    run = tmp_path / "run"
    cfg = write_config(
        tmp_path / "run.yaml",
        base_config(run, shards, zero=zero, model=MODEL, train={**TRAIN, "save_async": True}),
    )
    killed = torchrun(["pretrain", cfg], env={"DS_TRAIN_FAULT": "kill@step=5"}, check=False)
    assert killed.returncode != 0 and "ds-train: error" not in killed.stderr, killed.stderr[-3000:]
    saved = [c.step for c in complete_checkpoints(run / "checkpoints")]
    assert saved and max(saved) < 6, saved  # written in the background (periodic saves), before the kill
    resumed = torchrun(["pretrain", cfg]).stderr
    assert f"{STARTUP[name]} fp32" in resumed and f"resuming at step {max(saved)}" in resumed, resumed[-2000:]

    want_losses, want_weights = on_device
    losses = train_losses(run)
    assert sorted(losses) == sorted(want_losses)
    for step, loss in losses.items():  # CPU Adam vs torch AdamW: the same update up to rounding
        assert loss == pytest.approx(want_losses[step], rel=1e-5), (step, loss, want_losses[step])
    weights = _hf_tensors(run, tmp_path / "hf")
    assert set(weights) == set(want_weights)
    # Adam divides by the root of the second moment, so rounding in a near-zero gradient (a rare
    # token's embedding row) moves a few weights by up to ~1e-3 (measured: 7 of 524,288, 6.3e-4);
    # a lost or stale optimizer state moves nearly every weight, by about a step's update (lr = 1e-2)
    for key, want in want_weights.items():
        off = (weights[key] - want).abs()
        assert (off > 5e-5).float().mean() < 1e-4 and off.max() < 2e-3, (key, float(off.max()))
    if name.endswith("nvme"):  # the states really were swapped through the directory
        assert any(p.suffix == ".swp" for p in (tmp_path / "nvme").rglob("*")), list(
            (tmp_path / "nvme").rglob("*")
        )


def test_optimizer_offload_turned_on_at_a_resume(tmp_path, shards, on_device):
    """Out of memory at step N, a user resumes with optimizer offload: DeepSpeed's CPU Adam reads
    `bias_correction`, which the groups torch's AdamW saved lack (KeyError at the first step, every
    rank: cloud-user audit). The groups take the new optimizer's defaults; training goes on as if
    on the device."""
    run = tmp_path / "run"
    first = base_config(run, shards, model=MODEL, train=TRAIN)  # on the device, killed after step 4's save
    killed = torchrun(
        ["pretrain", write_config(tmp_path / "first.yaml", first)],
        env={"DS_TRAIN_FAULT": "kill@step=5"},
        check=False,
    )
    assert killed.returncode != 0 and max(c.step for c in complete_checkpoints(run / "checkpoints")) == 4
    zero = {"preset": "stage2-offload-optimizer", "stage": 2}
    resumed = torchrun(
        [
            "pretrain",
            write_config(
                tmp_path / "more.yaml", base_config(run, shards, zero=zero, model=MODEL, train=TRAIN)
            ),
        ]
    )
    assert "resuming at step 4" in resumed.stderr and "optimizer on cpu" in resumed.stderr
    want_losses, _ = on_device
    losses = train_losses(run)
    assert sorted(losses) == sorted(want_losses)
    for step, loss in losses.items():
        assert loss == pytest.approx(want_losses[step], rel=1e-5), (step, loss, want_losses[step])
