"""The token stream of one split, as the sharder's first phase left it: one pair of files per piece.

Per piece and split, `<piece>.<split>.tokens` holds the documents' tokens, each document followed
by its separator (raw uint16/uint32), and `<piece>.<split>.starts` the piece-local offset where
each document starts (raw int64). The split's stream is the concatenation of its pieces in piece
order; `SplitStream` reads any range of it through memory maps, so the second phase can write
each shard on its own with memory bounded by the shard size.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np


def piece_files(work_dir: str | os.PathLike, index: int, split: str) -> tuple[Path, Path]:
    base = Path(work_dir) / f"piece-{index:06d}.{split}"
    return base.with_name(base.name + ".tokens"), base.with_name(base.name + ".starts")


@dataclass(frozen=True)
class PieceCounts:
    index: int
    tokens: int
    documents: int


class SplitStream:
    """Random access to the concatenated token stream of one split."""

    def __init__(self, work_dir: str | os.PathLike, split: str, pieces: list[PieceCounts], dtype: np.dtype):
        self.work_dir, self.split, self.dtype = Path(work_dir), split, np.dtype(dtype)
        self.pieces = [p for p in pieces if p.tokens > 0]
        self.offsets = np.zeros(len(self.pieces) + 1, dtype=np.int64)
        np.cumsum([p.tokens for p in self.pieces], out=self.offsets[1:])

    @property
    def total_tokens(self) -> int:
        return int(self.offsets[-1])

    def _overlapping(self, lo: int, hi: int) -> range:
        first = int(np.searchsorted(self.offsets, lo, side="right")) - 1
        last = int(np.searchsorted(self.offsets, hi, side="left"))
        return range(max(first, 0), min(last, len(self.pieces)))

    def _map(self, k: int, which: int, dtype: np.dtype) -> np.ndarray:
        path = piece_files(self.work_dir, self.pieces[k].index, self.split)[which]
        if path.stat().st_size == 0:
            return np.empty(0, dtype=dtype)
        return np.memmap(path, dtype=dtype, mode="r")

    def tokens(self, lo: int, hi: int) -> np.ndarray:
        """Stream tokens [lo, hi) (clipped to the stream's end)."""
        hi = min(hi, self.total_tokens)
        out = np.empty(max(hi - lo, 0), dtype=self.dtype)
        for k in self._overlapping(lo, hi):
            base = int(self.offsets[k])
            a, b = max(lo, base), min(hi, int(self.offsets[k + 1]))
            out[a - lo : b - lo] = self._map(k, 0, self.dtype)[a - base : b - base]
        return out

    def documents(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        """(stream offsets, lengths incl. separator) of the documents starting in [lo, hi)."""
        starts, lengths = [], []
        for k in self._overlapping(lo, hi):
            base, end = int(self.offsets[k]), int(self.offsets[k + 1])
            local = self._map(k, 1, np.dtype(np.int64))
            i = int(np.searchsorted(local, lo - base, side="left"))
            j = int(np.searchsorted(local, hi - base, side="left"))
            s = np.asarray(local[i:j], dtype=np.int64)
            nxt = np.asarray(local[i + 1 : j + 1], dtype=np.int64)
            if len(nxt) < len(s):  # the last document of the piece ends where the piece ends
                nxt = np.append(nxt, end - base)
            starts.append(s + base)
            lengths.append(nxt - s)
        if not starts:
            return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
        return np.concatenate(starts), np.concatenate(lengths)
