"""Asynchronous checkpoint writes (`train.save_async`): copy the state to host memory, write it later.

A save blocks every rank for as long as its files take to write and hash; on a parallel file system
that is seconds to minutes per save, paid again at every `train.save_every`. Like torchtitan's and
OLMo-core's async checkpointing, a background save only blocks for the copy of each state dict to
host memory (`host_snapshot`: a memory copy, device to host on a GPU), then trains on while a
writer thread streams the copies to disk and hashes them (`BackgroundWriter`). The checkpoint is
completed (manifest, rename, `latest`) at the first step boundary after every rank's writes are
done, so an unfinished one is never `latest`. The cost: host memory for one copy of the rank's
checkpoint files while they are written, and a thread that shares the host's cores with the loop.

DeepSpeed's own decoupled writer (`checkpoint.writer.type: decoupled`) needs its FastPersist I/O
ops and a process per rank, and shares the tensors instead of copying them, so the next optimizer
step waits for its writes (DeepSpeed 0.19 `engine.step` commits first); this one works with
DeepSpeed's default `torch.save` writer, which ds-train hashes as it writes.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

log = logging.getLogger(__name__)

_IMMUTABLE = (str, bytes, int, float, bool, type(None), torch.dtype, torch.device, torch.Size)


def host_snapshot(obj: Any, memo: dict | None = None) -> Any:
    """A copy of a (nested) state dict that training can no longer change: every tensor copied to
    host memory. Tensors that share a storage (tied weights, views of DeepSpeed's flat buffers)
    share it in the copy too, each storage copied once, so `torch.save` writes exactly the bytes
    it would have written from the original (on a GPU, apart from each storage's device tag:
    `cpu` where the original says `cuda:N`)."""
    if isinstance(obj, _IMMUTABLE):
        return obj
    memo = {} if memo is None else memo
    # An object met twice (the betas tuple of every param group) is copied once, as pickle writes
    # it once: the same bytes. The state dict keeps every object alive, so ids are not reused.
    if id(obj) in memo:
        return memo[id(obj)]
    if isinstance(obj, torch.Tensor):
        out = _tensor_snapshot(obj, memo)
    elif isinstance(obj, dict):  # dict, OrderedDict, defaultdict: copy.copy keeps the type and extras
        out = copy.copy(obj)
        for key, value in obj.items():
            out[key] = host_snapshot(value, memo)
    elif isinstance(obj, list):
        out = [host_snapshot(v, memo) for v in obj]
    elif isinstance(obj, tuple):
        items = [host_snapshot(v, memo) for v in obj]
        out = type(obj)(*items) if hasattr(obj, "_fields") else tuple(items)
    else:
        out = copy.deepcopy(obj)  # other objects (a loss scaler, a config): no tensors of any size
    memo[id(obj)] = out
    return out


def _tensor_snapshot(t: torch.Tensor, memo: dict) -> torch.Tensor:
    if t.layout != torch.strided:  # sparse and the like: a plain copy, sharing not kept
        return t.detach().to("cpu", copy=True)
    storage = t.untyped_storage()
    # The storage's identity, as torch.save keys it (every empty ZeRO-3 placeholder has its own
    # storage, all at address 0): one copy per storage, and the same number of storages written.
    key = ("storage", storage._cdata)
    copied = memo.get(key)
    if copied is None:
        copied = storage.cpu() if storage.device.type != "cpu" else storage.clone()
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
        setattr(out, name, host_snapshot(value, memo))
    return out


class BackgroundWriter:
    """One thread that runs a rank's checkpoint writes in order; `busy()` says whether any is left,
    `wait()` blocks until none is and returns the first write's error, if any (as a message)."""

    def __init__(self) -> None:
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

    def busy(self) -> bool:
        return any(not job.done() for job in self._jobs)

    def wait(self) -> BaseException | None:
        try:
            for job in self._jobs:
                if (e := job.exception()) is not None:
                    return e
            return None
        finally:
            self._pool.shutdown(wait=True)
            self._jobs = []
