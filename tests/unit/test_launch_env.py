"""Launcher detection: every launcher's environment maps to the right rank/world/master."""

from __future__ import annotations

import pytest

from ds_train.distributed.launch_env import detect, expand_hostlist, port_for_job


def test_no_launcher_is_one_process():
    env = detect({})
    assert (env.launcher, env.rank, env.world_size, env.master_addr) == ("none", 0, 1, "127.0.0.1")
    assert 1024 < env.master_port < 65536


@pytest.mark.parametrize(
    ("extra", "launcher"),
    [
        ({"TORCHELASTIC_RUN_ID": "x"}, "torchrun"),
        ({"ACCELERATE_MIXED_PRECISION": "no"}, "accelerate"),
        ({"CROSS_RANK": "0", "CROSS_SIZE": "1"}, "deepspeed"),
    ],
)
def test_env_launchers(extra, launcher):
    env = detect(
        {
            "RANK": "3",
            "WORLD_SIZE": "4",
            "LOCAL_RANK": "1",
            "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "node7",
            "MASTER_PORT": "29555",
            **extra,
        }
    )
    assert (env.launcher, env.rank, env.local_rank, env.world_size, env.local_world_size) == (
        launcher,
        3,
        1,
        4,
        2,
    )
    assert (env.master_addr, env.master_port) == ("node7", 29555)


def test_srun_step_uses_slurm_variables():
    env = detect(
        {
            "SLURM_PROCID": "5",
            "SLURM_LOCALID": "1",
            "SLURM_STEP_NUM_TASKS": "8",
            "SLURM_NTASKS": "8",
            "SLURM_STEP_NODELIST": "gpu-[07-10]",
            "SLURM_JOB_ID": "123456",
            "SLURM_STEP_TASKS_PER_NODE": "2(x4)",
        }
    )
    assert (env.launcher, env.rank, env.local_rank, env.world_size, env.local_world_size) == (
        "srun",
        5,
        1,
        8,
        2,
    )
    assert env.master_addr == "gpu-07"
    assert env.master_port == port_for_job("123456")


def test_batch_script_without_srun_is_one_process():
    # Inside the sbatch script itself SLURM_NTASKS may be 8 but only one process runs.
    env = detect({"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_JOB_ID": "1"})
    assert (env.launcher, env.world_size) == ("none", 1)


def test_hostlist_expansion():
    assert expand_hostlist("n[1-3],login,gpu-[08-10,12]") == [
        "n1",
        "n2",
        "n3",
        "login",
        "gpu-08",
        "gpu-09",
        "gpu-10",
        "gpu-12",
    ]
    assert expand_hostlist("single") == ["single"]


def test_job_port_is_stable_and_in_range():
    assert port_for_job("4242") == port_for_job(4242)
    assert all(15000 <= port_for_job(j) < 32768 for j in (0, 1, 17767, 17768, 19999, 20000, 987654321))
