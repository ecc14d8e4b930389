"""DeepSpeed's compiled ops, loaded before DeepSpeed would, under a lock that dies with its holder.

DeepSpeed compiles some C++ ops on first use (CPU Adam for optimizer offload, async_io for NVMe,
its CPU accelerator's shared-memory collectives) through `torch.utils.cpp_extension.load`. torch
serialises builders of one op with a `lock` file made with O_EXCL and removed in a `finally` (its
FileBaton). A builder killed outright (Slurm's SIGKILL after KillWait on preemption or scancel, the
OOM killer, torchrun tearing down a failed job) leaves the file behind, and every later load of that
op waits for it forever, silently: the job sits at "Loading extension module" until its time limit
(pytorch/pytorch#189245; torch 2.13 still waits without a timeout).

So ds_train loads the ops a run needs itself, before DeepSpeed would (DeepSpeed keeps loaded ops
per process and reuses them). An op already built, with no lock, is loaded as DeepSpeed would, by
every rank at once (`guarded_load` says why). Any other is loaded holding an `fcntl.flock` on a file
beside torch's lock:
the kernel drops a flock when its holder dies, so ranks and jobs sharing the cache take turns and a
dead holder blocks nobody. The loader writes its host and pid beside torch's lock. Holding the
flock, a torch lock is taken as a killed build's, removed with a warning naming it, when:
- its writer was a ds_train process on this host that no longer exists, and no process on this
  host works in the build directory (ninja and the compilers run there; torch's builder holds the
  lock open): a rank OOM-killed mid-build leaves ninja running, and that build is waited for;
- or, whoever made it, nothing in the build directory changes while this process watches it for
  `stale_after_s` (a live build writes an object file per source). Watched, not compared with file
  times: on a shared file system another host's clock may differ.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# Watched this long with nothing in its build directory changing, a lock is a killed build's.
# DeepSpeed's CPU ops build in about a minute on 2 cores, writing an object file per source; two ops
# waited for in turn stay under run.collective_timeout_s (600 s), which the other ranks wait with.
DEFAULT_STALE_AFTER_S = 180.0
STALE_AFTER_ENV = "DS_TRAIN_OP_LOCK_STALE_S"  # overrides it
FLOCK_FILE = "ds_train.flock"  # our lock, beside torch's
OWNER_FILE = "lock.ds_train"  # who last loaded the op through ds_train: host and pid
POLL_S = 0.5

# DeepSpeed's optimizer type → the op its host-side (offloaded) implementation needs
_HOST_OPTIMIZER_OPS = {"adam": "CPUAdamBuilder", "adamw": "CPUAdamBuilder", "adagrad": "CPUAdagradBuilder",
                       "lion": "CPULionBuilder"}  # fmt: skip


def comm_ops(accelerator: str) -> list[str]:
    """Op builders (class names) that `deepspeed.init_distributed` loads: on its CPU accelerator,
    shared-memory collectives (`build_shm_op` in deepspeed/comm/torch.py)."""
    return ["ShareMemCommBuilder"] if accelerator == "cpu" else []


def ops_for(ds_config: dict) -> list[str]:
    """Op builders (class names) that `deepspeed.initialize` loads for this config."""
    zero = ds_config.get("zero_optimization") or {}
    devices = {(zero.get(k) or {}).get("device", "none") for k in ("offload_optimizer", "offload_param")}
    optimizer = ds_config.get("optimizer") or {}
    kind = str(optimizer.get("type", "")).lower()
    ops = []
    if (zero.get("offload_optimizer") or {}).get("device", "none") != "none":
        ops += [_HOST_OPTIMIZER_OPS[kind]] if kind in _HOST_OPTIMIZER_OPS else []
    elif kind in ("adam", "adamw") and not (optimizer.get("params") or {}).get("torch_adam"):
        ops.append("FusedAdamBuilder")  # ds_train sets torch_adam; an override may not
    if "nvme" in devices:
        ops.append("AsyncIOBuilder")  # Linux AIO swapping
    return ops


def load_ops(builders: list[str]) -> None:
    """Load (building on first use) DeepSpeed's ops by builder class name, safely (see the module
    docstring). Ops already loaded or installed prebuilt need no build and are left to DeepSpeed, as
    is one this machine cannot build (DeepSpeed skips or reports it)."""
    from deepspeed.accelerator import get_accelerator
    from deepspeed.git_version_info import accelerator_name, installed_ops
    from deepspeed.ops.op_builder.builder import OpBuilder

    stale_after_s = float(os.environ.get(STALE_AFTER_ENV, DEFAULT_STALE_AFTER_S))
    for name in builders:
        builder = get_accelerator().create_op_builder(name)
        if builder is None or builder.name in OpBuilder._loaded_ops:
            continue
        if installed_ops.get(builder.name) and accelerator_name == get_accelerator()._name:
            continue  # built into the DeepSpeed install (DS_BUILD_OPS=1): nothing is compiled
        if builder.is_compatible(verbose=False):
            guarded_load(builder.name, builder.load, stale_after_s)


def offload_op_problem(offload_optimizer: str, offload_param: str) -> str | None:
    """Why DeepSpeed could not swap to NVMe on this machine, or None (no NVMe offload, or it can).

    DeepSpeed builds its async_io op (Linux AIO, libaio) on first use, inside `deepspeed.initialize`
    on every rank, and a missing libaio surfaces there as a traceback ending in "Unable to JIT load
    the async_io op ... None". Checked before the process group exists, it is one line saying what
    to install. (CPU offload needs only the CPU Adam op, which any machine with a C++ compiler builds.)
    """
    if "nvme" not in (offload_optimizer, offload_param):
        return None
    from deepspeed.git_version_info import installed_ops
    from deepspeed.ops.op_builder import AsyncIOBuilder

    if installed_ops.get("async_io") or AsyncIOBuilder().is_compatible(verbose=False):
        return None
    return (
        "NVMe offload (zero.offload_optimizer/offload_param=nvme) needs DeepSpeed's async_io op, which "
        "cannot be built here: libaio's headers are missing (Debian/Ubuntu: apt-get install libaio-dev; "
        "RHEL: dnf install libaio-devel); DeepSpeed compiles the op on first use"
    )


def build_directory(op_name: str) -> Path:
    """Where torch builds `op_name` (DeepSpeed passes its op name to `cpp_extension.load`)."""
    # private, but it is the layout torch's own load uses; copying it would drift
    from torch.utils.cpp_extension import _get_build_directory

    return Path(_get_build_directory(op_name, verbose=False))


def guarded_load(
    op_name: str,
    load: Callable[[], Any],
    stale_after_s: float = DEFAULT_STALE_AFTER_S,
    directory: Path | None = None,
) -> Any:
    """`load()` (which may build in `directory`) holding our flock, a dead builder's lock cleared first."""
    with contextlib.ExitStack() as held:
        try:
            directory = directory or build_directory(op_name)
            # Built, and nobody building: loaded as DeepSpeed would, alongside the other ranks.
            # torch still hashes the sources and asks ninja (2.3 s here); taking turns on the flock
            # for that would add up over every rank of every node sharing the cache.
            unguarded = (directory / f"{op_name}.so").exists() and not (directory / "lock").exists()
            if not unguarded:
                held.enter_context(_flock(directory / FLOCK_FILE, op_name))
                _clear_stale_lock(directory, op_name, stale_after_s)
                owner = directory / OWNER_FILE
                owner.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
                held.callback(owner.unlink, missing_ok=True)
        except OSError as e:  # a read-only or full cache: torch says so if it has to build there
            log.warning("loading DeepSpeed's %s op without ds_train's guard: %s", op_name, e)
            unguarded = True
        if unguarded:
            return load()
        t0 = time.monotonic()
        module = load()
        if time.monotonic() - t0 > 5:
            log.info(
                "built DeepSpeed's %s op in %.0f s (cached in %s)", op_name, time.monotonic() - t0, directory
            )
        return module


@contextlib.contextmanager
def _flock(path: Path, op_name: str) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        try:
            _acquire(f.fileno(), path, op_name)
        except OSError as e:  # a filesystem without flock (some Lustre mounts): torch's lock alone
            if e.errno not in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                raise
            log.warning(
                "%s: no flock on this filesystem (%s); builds of %s are not serialised", path, e, op_name
            )
            yield
            return
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _acquire(fd: int, path: Path, op_name: str) -> None:
    told = False
    t0 = time.monotonic()
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            pass
        if not told and time.monotonic() - t0 > 10:
            log.info("waiting for another process loading DeepSpeed's %s op (%s)", op_name, path)
            told = True
        time.sleep(POLL_S)


def _clear_stale_lock(directory: Path, op_name: str, stale_after_s: float) -> None:
    """Wait while torch's lock belongs to a live build; remove it once it is a dead one's."""
    lock = directory / "lock"
    told = False
    contents, unchanged_since = None, time.monotonic()
    while lock.exists():
        reason = None
        now = _contents(directory)
        if now != contents:
            contents, unchanged_since = now, time.monotonic()
        if _processes_in(directory):  # a build on this host goes on (maybe without its starter)
            unchanged_since = time.monotonic()
        elif dead := _dead_owner(directory):
            reason = f"its ds_train process {dead} is gone and no process on this host works in the directory"
        elif time.monotonic() - unchanged_since >= stale_after_s:
            reason = f"nothing in {directory} changed in {stale_after_s:.0f} s of watching"
        if reason is not None:
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()
            log.warning(
                "removed %s, left by a build of DeepSpeed's %s op that was killed (%s); rebuilding",
                lock,
                op_name,
                reason,
            )
            return
        if not told:
            log.warning(
                "waiting on %s: another process is building DeepSpeed's %s op, or one was killed while "
                "building it (then the lock is removed once nothing in the directory changes for %.0f s)",
                lock,
                op_name,
                stale_after_s,
            )
            told = True
        time.sleep(POLL_S)


def _dead_owner(directory: Path) -> int | None:
    """The pid of the ds_train process on this host that last loaded the op, if it is gone."""
    try:
        owner = json.loads((directory / OWNER_FILE).read_text())
        host, pid = owner["host"], int(owner["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return pid if host == socket.gethostname() and not _alive(pid) else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def _processes_in(directory: Path) -> list[int]:
    """Processes on this host working in the build directory (ninja and the compilers torch starts
    there) or holding its lock open (torch's builder). Another user's processes cannot be seen, nor
    can they build in this user's cache."""
    import psutil

    target, lock = str(directory.resolve()), str((directory / "lock").resolve())
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.cwd() == target or any(f.path == lock for f in proc.open_files()):
                found.append(proc.pid)
        except (psutil.Error, OSError):
            continue  # gone, or another user's
    return found


def _contents(directory: Path) -> frozenset:
    """Name, size and modification time of everything in a build directory but our flock file
    (waiters open it): a build in progress changes it."""
    out = set()
    for p in directory.rglob("*"):
        if p.name != FLOCK_FILE:
            with contextlib.suppress(FileNotFoundError):
                st = p.stat()
                out.add((str(p), st.st_size, st.st_mtime_ns))
    return frozenset(out)
