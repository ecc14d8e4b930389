"""The same per-rank entry trains and checkpoints under every launcher, with identical losses."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ds_train.checkpoint.layout import latest_checkpoint
from tests.helpers import (
    REPO,
    base_config,
    clean_env,
    free_port,
    read_metrics,
    run_cli,
    train_losses,
    write_config,
)

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

STEPS = 3
BIN = Path(sys.executable).parent


def _config(tmp_path: Path, shards: Path, name: str) -> tuple[Path, Path]:
    run = tmp_path / name
    cfg = write_config(
        tmp_path / f"{name}.yaml", base_config(run, shards, train={"max_steps": STEPS}, zero={"stage": 3})
    )
    return run, cfg


def _check(run: Path, stderr: str, launcher: str, world: int) -> dict[int, float]:
    assert f"{launcher} launch, {world} rank(s)" in stderr, stderr[-3000:]
    assert latest_checkpoint(run / "checkpoints").step == STEPS
    records = [r for r in read_metrics(run) if "loss" in r]
    assert [r["world_size"] for r in records] == [world] * STEPS
    return train_losses(run)


def _run(cmd: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        cmd,
        cwd=REPO,
        env=clean_env({"PYTHON": sys.executable, **(env or {})}),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-6000:]
    return proc


@pytest.fixture(scope="module")
def results(tmp_path_factory, shards):
    tmp = tmp_path_factory.mktemp("launchers")
    out = {}
    run, cfg = _config(tmp, shards, "none")
    out["none"] = _check(run, run_cli(["pretrain", cfg]).stderr, "none", 1)

    run, cfg = _config(tmp, shards, "torchrun")
    out["torchrun"] = _check(run, _run(["bash", "launch/local.sh", "2", str(cfg)]).stderr, "torchrun", 2)

    run, cfg = _config(tmp, shards, "deepspeed")
    proc = _run(
        ["bash", "launch/deepspeed.sh", "2", str(cfg)],
        env={"DEEPSPEED": str(BIN / "deepspeed"), "MASTER_PORT": str(free_port())},
    )
    out["deepspeed"] = _check(run, proc.stderr + proc.stdout, "deepspeed", 2)

    run, cfg = _config(tmp, shards, "accelerate")
    proc = _run(
        ["bash", "launch/accelerate.sh", str(cfg)],
        env={"ACCELERATE": str(BIN / "accelerate")},  # GPUS_PER_NODE unset: 2 CPU ranks without a GPU
    )
    out["accelerate"] = _check(run, proc.stderr + proc.stdout, "accelerate", 2)

    # srun: every task is started by Slurm with SLURM_* variables and nothing else.
    run, cfg = _config(tmp, shards, "srun")
    job = str(os.getpid())
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "ds_train", "pretrain", str(cfg)],
            cwd=REPO,
            env=clean_env(
                {
                    "SLURM_JOB_ID": job,
                    "SLURM_PROCID": str(r),
                    "SLURM_LOCALID": str(r),
                    "SLURM_NTASKS": "2",
                    "SLURM_STEP_NUM_TASKS": "2",
                    "SLURM_STEP_NODELIST": "localhost",
                    "SLURM_STEP_TASKS_PER_NODE": "2",
                }
            ),
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(2)
    ]
    errs = [p.communicate(timeout=600)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs[0][-3000:] + errs[1][-3000:]
    out["srun"] = _check(run, errs[0], "srun", 2)
    return out


def test_every_launcher_trains_and_checkpoints(results):
    assert set(results) == {"none", "torchrun", "deepspeed", "accelerate", "srun"}


def test_launchers_agree_on_losses(results):
    ref = results["none"]
    for name, losses in results.items():
        for step in ref:
            assert losses[step] == pytest.approx(ref[step], rel=1e-4), f"{name} step {step}"
