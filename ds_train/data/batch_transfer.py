"""Move a batch from a DataLoader worker to the training process in ONE transfer.

torch sends every tensor of a batch through its own shared-memory segment and file descriptor,
at a fixed cost per tensor (about 0.5 ms on the 2-core development VM, more than gathering the
rows): a batch of ten tensors — tokens, labels, position ids, and the small per-sample ids the
trainer logs — spent ten times that. The worker packs all tensors into one byte buffer (a copy of
a few hundred KB), the training process unpacks them as zero-copy views, so a batch costs one
transfer whatever its number of fields. A small buffer goes through the worker's pipe as a numpy
array (pickled in-band: ~0.4 ms for 384 KB here, against ~1 ms for one shared-memory segment);
from SHM_BYTES on, shared memory is cheaper and the buffer goes as a tensor.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

ALIGN = 16  # every view starts at an offset its dtype can be read from
SHM_BYTES = 512 << 10


def pack_batch(batch: dict[str, Any]) -> tuple[list[tuple], torch.Tensor | np.ndarray]:
    """(layout, bytes): tensors become slices of one uint8 tensor; other values ride in the layout."""
    layout, total = [], 0
    tensors = []
    for key, value in batch.items():
        if torch.is_tensor(value):
            t = value.contiguous()
            nbytes = t.numel() * t.element_size()
            layout.append((key, t.dtype, tuple(t.shape), total, nbytes))
            tensors.append((t, total, nbytes))
            total += -(-nbytes // ALIGN) * ALIGN
        else:
            layout.append((key, None, value, 0, 0))
    flat = torch.empty(total, dtype=torch.uint8)
    for t, offset, nbytes in tensors:
        if nbytes:
            flat[offset : offset + nbytes] = t.reshape(-1).view(torch.uint8)
    return layout, (flat if total >= SHM_BYTES else flat.numpy())


def worker_message(e: BaseException) -> str:
    """The original message of an exception re-raised by a DataLoader worker."""
    text = str(e)
    if not (text.startswith("Caught ") and "Original Traceback" in text):
        return text
    marker = f"{type(e).__module__}.{type(e).__qualname__}: "
    return text.rsplit(marker, 1)[-1].strip() if marker in text else text.strip().splitlines()[-1]


def unpack_batch(packed: tuple[list[tuple], torch.Tensor | np.ndarray]) -> dict[str, Any]:
    layout, flat = packed
    if isinstance(flat, np.ndarray):
        flat = torch.from_numpy(flat)
    out = {}
    for key, dtype, shape, offset, nbytes in layout:
        if dtype is None:
            out[key] = shape  # a plain value, carried as is
        else:
            out[key] = flat[offset : offset + nbytes].view(dtype).view(shape)
    return out


class UnpackingLoader:
    """Iterates a DataLoader whose workers pack batches, yielding the unpacked dicts.

    A DataError in a worker comes back as DataError("Caught DataError in DataLoader worker
    process 0.\nOriginal Traceback ..."); it is re-raised with the worker's one-line message, so
    the user sees which shard and byte offset failed, not a traceback."""

    def __init__(self, loader: torch.utils.data.DataLoader):
        self.loader = loader

    def __iter__(self) -> Iterator[dict[str, Any]]:
        from ds_train.data.shard_set import DataError

        try:
            for packed in self.loader:
                yield unpack_batch(packed)
        except DataError as e:
            raise DataError(worker_message(e)) from None

    def __len__(self) -> int:
        return len(self.loader)
