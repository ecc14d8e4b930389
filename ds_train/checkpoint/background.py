"""Asynchronous checkpoint writes (`train.save_async`): copy the state to host memory, write it later.

A save blocks every rank for as long as its files take to write and hash; on a parallel file system
that is seconds to minutes per save, paid again at every `train.save_every`. Like torchtitan's and
OLMo-core's async checkpointing, a background save only blocks for the copy of each state dict to
host memory (`host_snapshot`: a memory copy, device to host on a GPU), then trains on while a
writer thread streams the copies to disk and hashes them (`BackgroundWriter`). The checkpoint is
completed (manifest, rename, `latest`) at the first step boundary after every rank's writes are
done, so an unfinished one is never `latest`. The cost: host memory for one copy of the rank's
checkpoint files (kept from one save to the next by `HostMemory`, so later copies skip allocating
it), and a thread that shares the host's cores with the loop.

DeepSpeed's own decoupled writer (`checkpoint.writer.type: decoupled`) needs its FastPersist I/O
ops and a process per rank, and shares the tensors instead of copying them, so the next optimizer
step waits for its writes (DeepSpeed 0.19 `engine.step` commits first); this one works with
DeepSpeed's default `torch.save` writer, which ds-train hashes as it writes.
"""

from __future__ import annotations

import copy
import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

log = logging.getLogger(__name__)

_IMMUTABLE = (str, bytes, int, float, bool, type(None), torch.dtype, torch.device, torch.Size)


class HostMemory:
    """Host storages for the copies of background saves, kept from one save to the next.

    A fresh allocation is paid again at every copy as page faults on first touch: on the CI VM a
    copy into new memory runs at 3.3 GB/s, into memory already touched at 15.7 GB/s
    (bench/bench_async_save.py measures that and the save's blocking time both ways). A
    checkpoint's storages have the same sizes at every save, so each copy takes a kept storage of
    its exact size (`torch.save` writes a storage whole: the size must match) and `release()`, once
    the writes that read them are done, keeps this save's storages for the next; `forget()` drops
    an abandoned save's. With `keep=False` each save allocates and frees its own.

    The memory is pageable. Page-locking it (`cudaHostRegister`, as torch's distributed checkpoint
    does; not `pin_memory()`, whose allocator rounds each block up to a power of two) would speed up
    a GPU's device-to-host copy, but torch's binding leaves a failed registration as CUDA's last
    error, raised by the next kernel launch: not done until a GPU run can test it."""

    def __init__(self, keep: bool = True) -> None:
        self.keep = keep
        self._free: dict[int, list[torch.UntypedStorage]] = {}
        self._taken: list[torch.UntypedStorage] = []

    def copy(self, storage: torch.UntypedStorage) -> torch.UntypedStorage:
        kept = self._free.get(storage.nbytes())
        out = kept.pop() if kept else torch.UntypedStorage(storage.nbytes())
        out.copy_(storage)
        self._taken.append(out)
        return out

    def release(self) -> None:
        """The writes reading the copies are done: keep their storages for the next save (the
        ones this save did not take are freed)."""
        self._free = {}
        if self.keep:
            for s in self._taken:
                self._free.setdefault(s.nbytes(), []).append(s)
        self._taken = []

    def forget(self) -> None:
        """The copies taken since the last release may still be read by an abandoned write: never
        hand them out again (they are freed when that write lets go of them)."""
        self._taken = []

    def kept_bytes(self) -> int:
        return sum(s.nbytes() for kept in self._free.values() for s in kept)


def host_snapshot(obj: Any, memo: dict | None = None, memory: HostMemory | None = None) -> Any:
    """A copy of a (nested) state dict that training can no longer change: every tensor copied to
    host memory (`memory`'s storages, else new ones). Tensors that share a storage (tied weights,
    views of DeepSpeed's flat buffers) share it in the copy too, each storage copied once, so
    `torch.save` writes exactly the bytes it would have written from the original (on a GPU, apart
    from each storage's device tag: `cpu` where the original says `cuda:N`)."""
    if isinstance(obj, _IMMUTABLE):
        return obj
    memo = {} if memo is None else memo
    memory = HostMemory(keep=False) if memory is None else memory  # new storages, freed with the copy
    # An object met twice (the betas tuple of every param group) is copied once, as pickle writes
    # it once: the same bytes. The state dict keeps every object alive, so ids are not reused.
    if id(obj) in memo:
        return memo[id(obj)]
    if isinstance(obj, torch.Tensor):
        out = _tensor_snapshot(obj, memo, memory)
    elif isinstance(obj, dict):  # dict, OrderedDict, defaultdict: copy.copy keeps the type and extras
        out = copy.copy(obj)
        for key, value in obj.items():
            out[key] = host_snapshot(value, memo, memory)
    elif isinstance(obj, list):
        out = [host_snapshot(v, memo, memory) for v in obj]
    elif isinstance(obj, tuple):
        items = [host_snapshot(v, memo, memory) for v in obj]
        out = type(obj)(*items) if hasattr(obj, "_fields") else tuple(items)
    else:
        out = copy.deepcopy(obj)  # other objects (a loss scaler, a config): no tensors of any size
    memo[id(obj)] = out
    return out


def _tensor_snapshot(t: torch.Tensor, memo: dict, memory: HostMemory) -> torch.Tensor:
    if t.layout != torch.strided:  # sparse and the like: a plain copy, sharing not kept
        return t.detach().to("cpu", copy=True)
    storage = t.untyped_storage()
    # The storage's identity, as torch.save keys it (every empty ZeRO-3 placeholder has its own
    # storage, all at address 0): one copy per storage, and the same number of storages written.
    key = ("storage", storage._cdata)
    copied = memo.get(key)
    if copied is None:
        copied = memory.copy(storage)
        memo[key] = copied
    out = torch.empty(0, dtype=t.dtype).set_(copied, t.storage_offset(), t.size(), t.stride())
    if isinstance(t, torch.nn.Parameter):
        out = torch.nn.Parameter(out, requires_grad=t.requires_grad)
    else:
        out.requires_grad_(t.requires_grad)
        if type(t) is not torch.Tensor:
            out = out.as_subclass(type(t))
    # Python attributes travel with the tensor in torch.save (DeepSpeed tags its flat fp32
    # partitions with a `ds_id`)
    for name, value in vars(t).items():
        setattr(out, name, host_snapshot(value, memo, memory))
    return out


class BackgroundWriter:
    """One thread that runs a rank's checkpoint writes in order; `busy()` says whether any is left,
    `wait()` blocks until none is and returns the first write's error, if any (the exception).
    `memory` holds the host copies the writes read; it is released for the next save by `wait()`.
    `abandon()` ends the writes early, for a run that fails with a save pending."""

    def __init__(self, memory: HostMemory | None = None) -> None:
        self.memory = memory if memory is not None else HostMemory(keep=False)
        self.abandoned = threading.Event()  # the writes' files raise at their next write once set
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="checkpoint-writer")
        self._jobs: list[Future] = []

    def submit(self, write: Callable[[], None]) -> None:
        self._jobs.append(self._pool.submit(write))

    def fail(self, error: BaseException) -> None:
        """Record an error met before a write could be queued (the host copy ran out of memory):
        reported by `wait()` like a failed write, so every rank learns of it when the save completes."""
        failed: Future = Future()
        failed.set_exception(error)
        self._jobs.append(failed)

    def abandon(self) -> None:
        """Stop writing: files not begun are never begun, the one being written stops within 64 MB
        (HashingWriter checks between pieces). Without it a failing run's process would wait for
        the writes at exit: the executor's thread is joined then."""
        self.abandoned.set()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._jobs = []
        self.memory.forget()

    def busy(self) -> bool:
        return any(not job.done() for job in self._jobs)

    def wait(self) -> BaseException | None:
        try:
            errors = [job.exception() for job in self._jobs]  # each blocks until its job is done
        except BaseException:  # interrupted (Ctrl-C): stop the writes instead of waiting on
            self.abandon()
            raise
        self._pool.shutdown(wait=True)
        self._jobs = []
        self.memory.release()  # no write reads the copies any more
        return next((e for e in errors if e is not None), None)
