"""A run killed while DeepSpeed compiles its CPU Adam op, then started again: torch leaves the op's
build lock behind, and without ds_train's guard the second run would wait on it for ever
(ds_train/distributed/op_builds.py). Real DeepSpeed, real compiler, real SIGKILL; an empty
extensions directory of its own so that the op is built, not found in the shared cache."""

from __future__ import annotations

import subprocess
import time

import pytest

from ds_train.distributed.op_builds import FLOCK_FILE
from tests.helpers import (
    REPO,
    base_config,
    clean_env,
    kill_job,
    torchrun,
    torchrun_command,
    train_losses,
    write_config,
)

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def test_a_run_killed_while_building_an_op_starts_again_without_hanging(tmp_path, shards):
    ext = tmp_path / "torch_extensions"
    env = {"TORCH_EXTENSIONS_DIR": str(ext)}
    run = tmp_path / "run"
    zero = {"preset": "stage2-offload-optimizer", "stage": 2}
    cfg = write_config(tmp_path / "run.yaml", base_config(run, shards, zero=zero, train={"max_steps": 3}))
    first = subprocess.Popen(
        torchrun_command("ds_train", ["pretrain", cfg]),
        cwd=REPO,
        env=clean_env(env),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    lock = ext / "cpu_adam" / "lock"
    t0 = time.monotonic()
    while not lock.exists():
        assert first.poll() is None, "the first run ended before building the op"
        assert time.monotonic() - t0 < 300, "the op build never started"
        time.sleep(0.1)
    kill_job(first)  # launcher, ranks, ninja and compilers, at once
    assert lock.exists(), "the kill left no stale lock: nothing is tested"

    second = torchrun(["pretrain", cfg], env=env, timeout=900)
    assert f"removed {lock}" in second.stderr and "is gone" in second.stderr, second.stderr[-3000:]
    assert sorted(train_losses(run)) == [1, 2, 3]
    assert not lock.exists()
    # every op DeepSpeed loaded in the run (CPU Adam, and the CPU accelerator's shared-memory
    # collectives) went through the guard: each build directory holds its flock file
    built = {d.name: (d / FLOCK_FILE).exists() for d in ext.iterdir()}
    assert {"cpu_adam", "deepspeed_shm_comm"} <= set(built) and all(built.values()), built
