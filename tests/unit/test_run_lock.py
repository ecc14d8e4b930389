"""One run at a time in a run directory: a second start is refused in one line naming the first
(two runs in one directory both started fresh and overwrote each other's checkpoints, silently)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch.distributed as dist

from ds_train.config import ConfigError
from ds_train.train.run_lock import LOCK_FILE, RunDirLock
from tests.helpers import base_config, run_cli, write_config


def test_a_held_directory_is_refused_and_freed_when_its_holder_ends(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from ds_train.train.run_lock import RunDirLock; "
         f"RunDirLock({str(tmp_path / 'run')!r}).acquire(); print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(ConfigError, match=rf"is in use by another run \(pid {holder.pid} on .*, since "):
        RunDirLock(tmp_path / "run").acquire()
    holder.kill()  # killed outright: the kernel drops its lock with the process
    holder.wait()
    lock = RunDirLock(tmp_path / "run").acquire()
    # the lock is the process's, not the open file's: a forked child (a DataLoader worker) that
    # outlives its parent does not keep the directory
    if os.fork() == 0:
        time.sleep(3)
        os._exit(0)
    lock.release()
    probe = subprocess.run(
        [sys.executable, "-c", f"from ds_train.train.run_lock import RunDirLock; RunDirLock({str(tmp_path / 'run')!r}).acquire()"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert probe.returncode == 0, probe.stderr


def test_a_second_start_is_refused_before_any_work(tmp_path, shards):
    cfg = write_config(tmp_path / "run.yaml", base_config(tmp_path / "run", shards))
    lock = RunDirLock(tmp_path / "run").acquire()  # a run already going
    try:
        proc = run_cli(["pretrain", cfg], check=False)
        assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [LOCK_FILE]  # nothing written
    finally:
        lock.release()
    assert proc.returncode == 2, proc.stderr
    assert "is in use by another run" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()  # made for the lock alone, and nothing else written: removed
    assert not dist.is_initialized()


def test_an_nvme_swap_path_in_use_on_this_node_is_refused(tmp_path, shards):
    """Two runs swapping to one zero.nvme_path overwrite each other's files (DeepSpeed's names there
    are fixed): the second is refused, naming the first, before it writes anything."""
    from ds_train.train.run_lock import NvmeSwapLock

    swap = tmp_path / "nvme"
    zero = {"stage": 3, "offload_optimizer": "nvme", "nvme_path": str(swap)}
    cfg = write_config(tmp_path / "run.yaml", base_config(tmp_path / "run", shards, zero=zero))
    other = NvmeSwapLock(swap, run="runs/stable").acquire()  # the parent run, on this node
    try:
        proc = run_cli(["pretrain", cfg], check=False)
    finally:
        other.release()
    assert proc.returncode == 2, proc.stderr
    assert (
        f"zero.nvme_path {swap} is in use by another run (runs/stable, pid {os.getpid()} on " in proc.stderr
    )
    assert "give each run its own zero.nvme_path" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()  # its own directory's lock released, the directory removed
