"""Write sharded safetensors files tensor by tensor, straight from memory-mapped rank files.

The `safetensors` library serialises a dict of in-memory tensors; converting a 70B model that way
needs the whole model in RAM (what makes DeepSpeed's zero_to_fp32 need >1 TB, DeepSpeed #4025).
The format is simple — an 8-byte header length, a JSON header with every tensor's dtype, shape and
byte range, then the raw bytes — and every shape is known before any weight is read, so the
header is written first and the data streamed after it in chunks. Pages of the rank files are
released (MADV_DONTNEED) once copied: peak RSS is one chunk, not one model. The files are read
back by the `safetensors` library in the tests.
"""

from __future__ import annotations

import contextlib
import json
import math
import mmap
import os
import struct
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from ds_train.convert.zero_layout import TensorPlan

CHUNK_BYTES = 64 << 20
DTYPE_CODES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


@dataclass
class OutputTensor:
    plan: TensorPlan
    dtype: torch.dtype  # dtype written

    @property
    def nbytes(self) -> int:
        return self.plan.numel * torch.empty((), dtype=self.dtype).element_size()


def shard_layout(tensors: list[OutputTensor], max_shard_bytes: int) -> list[list[OutputTensor]]:
    """Split tensors, in order, into shards of at most max_shard_bytes (a larger tensor gets its own)."""
    shards: list[list[OutputTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


class PieceReader:
    """Reads byte ranges of rank files through one read-only mmap per file."""

    def __init__(self):
        self._maps: dict[str, tuple[object, mmap.mmap]] = {}

    def _map(self, path: str) -> mmap.mmap:
        if path not in self._maps:
            fh = open(path, "rb")
            self._maps[path] = (fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ))
        return self._maps[path][1]

    def chunks(self, plan: TensorPlan, chunk_bytes: int = CHUNK_BYTES) -> Iterable[memoryview]:
        """The tensor's bytes in order, as read-only views of at most chunk_bytes, padding trimmed.

        A view is valid until the next one is requested: its pages are then dropped from this
        process's resident set, which is what bounds memory to one chunk."""
        itemsize = torch.empty((), dtype=plan.dtype).element_size()
        remaining = plan.numel
        step = max(1, chunk_bytes // itemsize)
        for piece in plan.pieces:
            take_piece = min(piece.numel, remaining)
            mm = self._map(piece.file)
            done = 0
            while done < take_piece:
                n = min(step, take_piece - done)
                start = piece.offset + done * itemsize
                if start + n * itemsize > len(mm):
                    raise ValueError(f"{piece.file}: {plan.name} runs past the end of the file (truncated)")
                view = memoryview(mm)[start : start + n * itemsize]
                try:
                    yield view
                finally:
                    view.release()  # a view must be gone before the map closes
                    _release(mm, start, n * itemsize)
                done += n
            remaining -= take_piece
            if remaining == 0:
                return

    def close(self) -> None:
        for fh, mm in self._maps.values():
            mm.close()
            fh.close()
        self._maps.clear()


def _release(mm: mmap.mmap, start: int, length: int) -> None:
    """Drop copied pages from this process's resident set (they stay in the page cache)."""
    if not hasattr(mm, "madvise"):
        return
    page = mmap.PAGESIZE
    lo = (start // page) * page
    hi = math.ceil((start + length) / page) * page
    with contextlib.suppress(OSError, ValueError):
        mm.madvise(mmap.MADV_DONTNEED, lo, min(hi, len(mm)) - lo)


def _read_only_tensor(chunk: memoryview, dtype: torch.dtype) -> torch.Tensor:
    """A tensor over a read-only mmap view, without torch's "The given buffer is not writable"
    UserWarning: it warns that writes through the tensor would reach the buffer, and this tensor
    is only read (converted to a new tensor at once). `convert to-hf` printed it to every user."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)
        return torch.frombuffer(chunk, dtype=dtype)


def write_safetensors(
    path: str | os.PathLike,
    tensors: list[OutputTensor],
    reader: PieceReader,
    metadata: dict[str, str] | None = None,
    before_tensor: Callable[[], None] | None = None,
) -> None:
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for t in tensors:
        header[t.plan.name] = {
            "dtype": DTYPE_CODES[t.dtype],
            "shape": list(t.plan.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(blob)))
        fh.write(blob)
        for t in tensors:
            if before_tensor is not None:
                before_tensor()
            written = 0
            for chunk in reader.chunks(t.plan):
                if t.dtype == t.plan.dtype:
                    fh.write(chunk)  # straight from the page cache: no copy in this process
                    written += len(chunk)
                else:
                    out = _read_only_tensor(chunk, t.plan.dtype).to(t.dtype)
                    fh.write(out.view(torch.uint8).numpy().data)
                    written += out.numel() * out.element_size()
            if written != t.nbytes:
                raise ValueError(f"{t.plan.name}: wrote {written} of {t.nbytes} bytes")


def write_sharded(
    out_dir: Path,
    tensors: list[OutputTensor],
    max_shard_bytes: int,
    reader: PieceReader,
    before_tensor: Callable[[], None] | None = None,
) -> list[str]:
    """model-0000i-of-0000n.safetensors + model.safetensors.index.json; returns the file names.

    `before_tensor` runs before each tensor is written; an exception from it stops the writing."""
    shards = shard_layout(tensors, max_shard_bytes)
    n = len(shards)
    names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map = {}
    for name, shard in zip(names, shards):
        write_safetensors(out_dir / name, shard, reader, before_tensor=before_tensor)
        weight_map.update({t.plan.name: name for t in shard})
    index = {"metadata": {"total_size": sum(t.nbytes for t in tensors)}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True))
    return names
