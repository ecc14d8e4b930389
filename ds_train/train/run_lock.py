"""One run at a time in a run directory.

Two starts on the same `run.output_dir` (a job submitted twice, a relaunch while the first is
still up) both decide "fresh start" or "resume from step N" before either saves, then write their
checkpoints, metrics and exports over each other's, and nothing says so. Rank 0 of a start holds
a POSIX lock (`fcntl.lockf`) on `<run_dir>/ds_train.lock` for the whole run: the kernel drops it
when the process ends however it ends (SIGKILL included), so a dead run never blocks the next one.
POSIX rather than flock: a flock belongs to the open file, which the DataLoader workers forked
from rank 0 share and may outlive it by seconds; a POSIX lock belongs to the process alone (and
NFS serves it across hosts). The holder writes its host, pid and start
time into the file, for the refusal to name. A file system without locks (Lustre mounted without
`flock`) gets a warning and no lock: it cannot be enforced there.

The same lock guards `zero.nvme_path` on each node (`NvmeSwapLock`, held by each node's local rank
0): DeepSpeed swaps to fixed file names there (`zero_stage_3/optimizer/rank0/...`), so two runs on
one node with the same path (a branch's config copied from its parent, say) overwrite each other's
optimizer state and parameters, silently.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path

from ds_train.config import ConfigError

log = logging.getLogger(__name__)

LOCK_FILE = "ds_train.lock"
_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


class RunDirLock:
    """Held by rank 0 from before the run writes anything until it ends (`release`, or exit)."""

    key = "run.output_dir"
    clash = "two runs in one directory overwrite each other's checkpoints; wait for it to end, or use another run.output_dir"

    def __init__(self, run_dir: str | os.PathLike, run: str | None = None):
        self.path = Path(run_dir) / LOCK_FILE
        self.run = run  # the run holding it, for a refusal to name (the lock's own directory if None)
        self._fd: int | None = None
        self._made_dir = False  # the directory did not exist: removed again if nothing else is written

    def acquire(self) -> RunDirLock:
        """Take the lock or raise ConfigError naming the run that holds it."""
        try:
            self._made_dir = not self.path.parent.exists()
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise ConfigError(f"{self.key} {self.path.parent}: cannot be written ({e.strerror})") from None
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EACCES):
                holder = _describe(fd)
                os.close(fd)
                raise ConfigError(
                    f"{self.key} {self.path.parent} is in use by another run ({holder}): {self.clash}"
                ) from None
            os.close(fd)
            if e.errno in _NO_LOCKS:
                log.warning(
                    "%s: this file system does not support locks, so nothing stops a second run from "
                    "using this directory at the same time",
                    self.path.parent,
                )
                return self
            raise
        owner = {
            **({"run": self.run} if self.run else {}),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "since": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(owner).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        if self._made_dir and [p.name for p in self.path.parent.iterdir()] == [LOCK_FILE]:
            # a start that failed before writing anything leaves no directory behind
            self.path.unlink()
            self.path.parent.rmdir()
        os.close(self._fd)  # closing the descriptor drops the lock
        self._fd = None


class NvmeSwapLock(RunDirLock):
    """Held by each node's local rank 0 on zero.nvme_path while the run swaps there."""

    key = "zero.nvme_path"
    clash = (
        "DeepSpeed swaps each rank's optimizer state and parameters to fixed file names there, so two runs "
        "on one node would overwrite each other's; give each run its own zero.nvme_path"
    )


def _describe(fd: int) -> str:
    try:
        owner = json.loads(os.pread(fd, 4096, 0) or b"{}")
        run = f"{owner['run']}, " if owner.get("run") else ""
        return f"{run}pid {owner['pid']} on {owner['host']}, since {owner['since']}"
    except (ValueError, KeyError, TypeError, OSError):
        return "its owner did not record itself"
