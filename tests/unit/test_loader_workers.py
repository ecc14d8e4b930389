"""DataLoader workers and the signals a job's processes get: Slurm's and torchrun's SIGTERM (and
Slurm's SIGUSR1, a terminal's Ctrl-C) reach the workers too, and must leave them serving the rank that is finishing its
step to checkpoint; a rank killed outright must not leave its workers behind (data/loader.py,
`_worker_start`)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import torch
from torch.utils.data import Dataset

from ds_train.data.loader import make_loader


class _Pids(Dataset):
    def __getitem__(self, k: int) -> dict:
        return {"pid": torch.tensor(os.getpid()), "k": torch.tensor(k)}


def test_workers_outlive_the_preemption_signals_the_whole_job_gets():
    batches = iter(make_loader(_Pids(), num_workers=2, prefetch_factor=1, num_micro_batches=40))
    workers = {int(next(batches)["pid"]) for _ in range(4)}
    assert len(workers) == 2 and os.getpid() not in workers
    for pid in workers:  # as `scancel --signal=TERM`/torchrun would: sent by another process
        subprocess.run(["kill", "-TERM", str(pid)], check=True)
        subprocess.run(["kill", "-USR1", str(pid)], check=True)
        subprocess.run(["kill", "-INT", str(pid)], check=True)  # Ctrl-C reaches the whole group
    time.sleep(0.5)
    rest = [int(b["k"]) for b in batches]  # a dead worker would make torch raise here
    assert rest == list(range(4, 40))
    assert not any(_alive(pid) for pid in workers)  # and they left when the loader ended


ABANDONED = textwrap.dedent(
    """
    import torch
    from torch.utils.data import Dataset
    from ds_train.data.loader import make_loader

    class Rows(Dataset):
        def __getitem__(self, k):
            return {"k": torch.tensor(k)}

    batches = iter(make_loader(Rows(), num_workers=2, prefetch_factor=2))
    next(batches)
    print("exiting", flush=True)  # the endless iterator left open, as a finished run leaves it
    """
)


def test_a_rank_exiting_with_its_loader_open_still_stops_its_workers():
    """multiprocessing's exit handler stops a process's workers with SIGTERM and joins them: a
    worker that ignored its own rank's SIGTERM too would hang every exit."""
    proc = subprocess.run([sys.executable, "-c", ABANDONED], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "exiting" in proc.stdout, proc.stderr[-2000:]


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


RANK = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    from torch.utils.data import Dataset
    from ds_train.data.loader import make_loader

    class Big(Dataset):  # 300 KB batches: through the worker's pipe, which a few of them fill
        def __getitem__(self, k):
            import os
            return {"pid": np.int64(os.getpid()), "rows": np.zeros(300_000, dtype=np.uint8)}

    batches = iter(make_loader(Big(), num_workers=1, prefetch_factor=4))
    print(int(next(batches)["pid"]), flush=True)
    time.sleep(600)  # a rank stuck, then SIGKILLed, with the worker's batches unread
    """
)


def test_a_worker_does_not_outlive_a_rank_killed_outright(tmp_path):
    rank = subprocess.Popen([sys.executable, "-c", RANK], stdout=subprocess.PIPE, text=True)
    try:
        worker = int(rank.stdout.readline())
        time.sleep(1.0)  # its next batches fill the pipe
        rank.kill()
        rank.wait()
        deadline = time.monotonic() + 20
        while _alive(worker) and time.monotonic() < deadline:
            time.sleep(0.2)
        if _alive(worker):
            os.kill(worker, signal.SIGKILL)
            raise AssertionError("the worker outlived its rank by 20 s")
    finally:
        rank.kill()
