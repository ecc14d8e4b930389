"""Random access to packed rows inside tar shards.

webdataset streams tar files front to back and cannot seek, which is why it has no mid-epoch
resume (webdataset #234, #271). Our members are uncompressed .npy arrays, so a row is a fixed
number of bytes at a known offset: we read the tar headers once per shard (tarfile, ~1 KB per
member), memory-map the file and copy rows straight out of it (Megatron's indexed-dataset idea
applied to webdataset shards), with one vectorised gather per member. Remote shards are first
cached locally (see remote.py).

A shard that cannot be read raises DataError naming the shard and the byte offset. With
`skip_corrupt`, its unreadable rows (all of them, or those past the point where a truncated file
ends) come back flagged instead, and the caller replaces them with padding and counts them.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from pathlib import Path

import numpy as np

from ds_train.data.remote import fetch_to_cache
from ds_train.data.shard_format import Member, ShardReadError, read_members
from ds_train.data.shard_set import DataError, ShardSet

log = logging.getLogger(__name__)

MAX_OPEN_SHARDS = 64


class _OpenShard:
    """One shard's members as 2-D views of a memory map; rows ≥ `readable` are lost (truncated)."""

    def __init__(self, path: Path, members: list[Member], row_width: int, dtype: np.dtype, problem: str = ""):
        self.path, self.problem = path, problem
        self.first_rows = np.asarray([m.first_row for m in members], dtype=np.int64)
        self.readable = sum(m.rows for m in members)
        mm = np.memmap(path, dtype=np.uint8, mode="r") if members else None
        self.views = [
            np.frombuffer(mm, dtype=dtype, count=m.rows * row_width, offset=m.data_offset).reshape(
                m.rows, row_width
            )
            for m in members
        ]

    def gather(self, rows: np.ndarray, out: np.ndarray) -> None:
        """out[i] = row rows[i] (all < readable)."""
        m = np.searchsorted(self.first_rows, rows, side="right") - 1
        if len(self.views) == 1:
            out[:] = self.views[0][rows]
            return
        for k in np.unique(m):
            sel = m == k
            out[sel] = self.views[k][rows[sel] - self.first_rows[k]]


class RowReader:
    """Reads rows of several shard sets; one per DataLoader worker (opened lazily, after fork)."""

    def __init__(
        self, sources: list[ShardSet], cache_dir: str | os.PathLike | None, *, skip_corrupt: bool = False
    ):
        self.sources = sources
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.skip_corrupt = skip_corrupt
        self._open: OrderedDict[tuple[int, int], _OpenShard] = OrderedDict()

    def read(self, source: np.ndarray, shard: np.ndarray, row: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(rows [n, seq_len + 1], lost [n] bool); `lost` is all False unless skip_corrupt."""
        first = self.sources[0]
        out = np.empty((len(row), first.seq_len + 1), dtype=first.dtype)
        lost = np.zeros(len(row), dtype=bool)
        keys = np.asarray(source, dtype=np.int64) * (1 << 40) + shard
        order = np.argsort(keys, kind="stable")
        bounds = np.flatnonzero(np.diff(keys[order])) + 1
        for sel in np.split(order, bounds):
            if not len(sel):
                continue
            opened = self._shard(int(source[sel[0]]), int(shard[sel[0]]))
            want = row[sel]
            bad = want >= opened.readable
            if bad.any():
                if not self.skip_corrupt:
                    raise DataError(opened.problem)
                lost[sel[bad]] = True
                out[sel[bad]] = 0
                sel, want = sel[~bad], want[~bad]
            if len(sel):
                block = np.empty((len(sel), out.shape[1]), dtype=out.dtype)
                opened.gather(want, block)
                out[sel] = block
        return out, lost

    def _shard(self, s: int, i: int) -> _OpenShard:
        key = (s, i)
        if key in self._open:
            self._open.move_to_end(key)
            return self._open[key]
        opened = self._open_shard(s, i)
        self._open[key] = opened
        while len(self._open) > MAX_OPEN_SHARDS:
            self._open.popitem(last=False)
        return opened

    def _open_shard(self, s: int, i: int) -> _OpenShard:
        shard_set = self.sources[s]
        uri = shard_set.shard_uri(i)
        width, dtype = shard_set.seq_len + 1, shard_set.dtype
        expected = int(shard_set.rows[i])
        try:
            path = self._local_path(shard_set, i, uri)
            members = read_members(path, shard_set.seq_len, dtype)
            rows = sum(m.rows for m in members)
            if rows != expected:
                end = members[-1].data_offset + members[-1].rows * width * dtype.itemsize if members else 0
                raise ShardReadError(
                    f"shard {uri}: holds {rows} rows but the manifest says {expected}: truncated or "
                    f"replaced (the readable part ends at byte {end})",
                    end,
                    members,
                )
            return _OpenShard(path, members, width, dtype)
        except ShardReadError as e:
            message = str(e) if str(e).startswith("shard ") else f"shard {e}"
            if not self.skip_corrupt:
                raise DataError(message) from None
            log.warning("%s; data.skip_corrupt: its unreadable rows are replaced by padding", message)
            members = [m for m in e.members if m.first_row + m.rows <= expected]
            return _OpenShard(Path(path), members, width, dtype, message)
        except (DataError, OSError) as e:
            message = str(e) if isinstance(e, DataError) else f"shard {uri}: {e}"
            if not self.skip_corrupt:
                raise DataError(message) from None
            log.warning("%s; data.skip_corrupt: its rows are replaced by padding", message)
            return _OpenShard(Path(uri), [], width, dtype, message)

    def _local_path(self, shard_set: ShardSet, i: int, uri: str) -> Path:
        if shard_set.is_local:
            path = Path(uri)
            if not path.is_file():
                raise DataError(f"shard {uri} is missing (listed in the manifest of {shard_set.location})")
            return path
        if self.cache_dir is None:
            raise DataError(f"remote shard {uri} needs data.cache_dir")
        cache = self.cache_dir / shard_set.fingerprint[:16]
        return fetch_to_cache(uri, cache, shard_set.names[i], shard_set.sha256[i] or None)
