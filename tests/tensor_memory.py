"""Peak bytes of live tensors, exactly, on CPU: the memory a GPU's caching allocator would report as
allocated, for checking memory formulas without a GPU.

PyTorch keeps no allocation statistics for the CPU, and RSS moves with the allocator's caching and
the page cache. So this counts from the dispatcher instead: every storage an operator returns that
none of its inputs owned is a new allocation, counted until its Python storage object dies (PyTorch
keeps one such object per storage for as long as the storage lives). Tensors that existed before
the meter started (weights, inputs) are not counted.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LiveTensorBytes(TorchDispatchMode):
    """`with LiveTensorBytes() as meter: ...`, then `meter.peak` (bytes) and `meter.live`."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._counted: set[int] = set()

    def _freed(self, ptr: int, nbytes: int) -> None:
        self._counted.discard(ptr)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if torch.is_tensor(t)}
        for t in tree_leaves(out):
            if not torch.is_tensor(t):
                continue
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr and ptr not in inputs and ptr not in self._counted:  # new, not a view or in-place
                self._counted.add(ptr)
                self.live += storage.nbytes()
                self.peak = max(self.peak, self.live)
                weakref.finalize(storage, self._freed, ptr, storage.nbytes())
        return out
