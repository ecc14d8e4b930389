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

import bisect
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
    """One shard's members inside a memory map; rows ≥ `readable` are lost (truncated file)."""

    def __init__(self, path: Path, members: list[Member], row_bytes: int, problem: str = ""):
        self.path, self.problem, self.row_bytes = path, problem, row_bytes
        self.first_rows = [m.first_row for m in members]
        self.offsets = [m.data_offset for m in members]
        self.readable = sum(m.rows for m in members)
        # The sharder cuts members of equal row counts (the last may be shorter): the member of a
        # row is then a division, not a bisect (the reader's per-row cost is most of its time).
        per = members[0].rows if members else 0
        uniform = all(m.rows == per for m in members[:-1]) and members and members[-1].rows <= per
        self.rows_per_member = per if uniform else 0
        self.buf = memoryview(np.memmap(path, dtype=np.uint8, mode="r")).cast("B") if members else None

    def byte_offset(self, row: int) -> int:
        if self.rows_per_member:
            m, k = divmod(row, self.rows_per_member)
            return self.offsets[m] + k * self.row_bytes
        m = bisect.bisect_right(self.first_rows, row) - 1
        return self.offsets[m] + (row - self.first_rows[m]) * self.row_bytes


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
        dest = memoryview(out).cast("B")
        rb = out.shape[1] * out.itemsize
        # One slice copy per row: a row is kilobytes, so a Python loop over a micro-batch costs
        # less than the dozen numpy calls per shard that grouping rows by shard would.
        for j, (s, i, r) in enumerate(zip(source.tolist(), shard.tolist(), row.tolist())):
            opened = self._open.get((s, i)) or self._shard(s, i)
            if r >= opened.readable:
                if not self.skip_corrupt:
                    raise DataError(opened.problem)
                lost[j] = True
                dest[j * rb : (j + 1) * rb] = bytes(rb)
                continue
            per = opened.rows_per_member
            if per:  # byte_offset, inlined
                m, k = divmod(r, per)
                off = opened.offsets[m] + k * rb
            else:
                off = opened.byte_offset(r)
            dest[j * rb : (j + 1) * rb] = opened.buf[off : off + rb]
        return out, lost

    def _shard(self, s: int, i: int) -> _OpenShard:
        """Open shard (s, i), keeping the MAX_OPEN_SHARDS most recently opened ones."""
        key = (s, i)
        if key in self._open:
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
        row_bytes = width * dtype.itemsize
        expected = int(shard_set.rows[i])
        try:
            path = self._local_path(shard_set, i, uri)
            members = read_members(path, shard_set.seq_len, dtype)
            rows = sum(m.rows for m in members)
            if rows != expected:
                end = members[-1].data_offset + members[-1].rows * width * dtype.itemsize if members else 0
                raise ShardReadError(
                    f"shard {uri}: holds {rows} rows but the manifest says {expected}: truncated or "
                    f"replaced (the file has {os.path.getsize(path)} bytes, its readable rows end at byte {end})",
                    end,
                    members,
                )
            return _OpenShard(path, members, row_bytes)
        except ShardReadError as e:
            message = str(e) if str(e).startswith("shard ") else f"shard {e}"
            if not self.skip_corrupt:
                raise DataError(message) from None
            log.warning("%s; data.skip_corrupt: its unreadable rows are replaced by padding", message)
            members = [m for m in e.members if m.first_row + m.rows <= expected]
            return _OpenShard(Path(path), members, row_bytes, message)
        except (DataError, OSError) as e:
            message = str(e) if isinstance(e, DataError) else f"shard {uri}: {e}"
            if not self.skip_corrupt:
                raise DataError(message) from None
            log.warning("%s; data.skip_corrupt: its rows are replaced by padding", message)
            return _OpenShard(Path(uri), [], row_bytes, message)

    def _local_path(self, shard_set: ShardSet, i: int, uri: str) -> Path:
        if shard_set.is_local:
            path = Path(uri)
            if not path.is_file():
                raise DataError(f"shard {uri} is missing (listed in the manifest of {shard_set.location})")
            return path
        if self.cache_dir is None:
            raise DataError(f"remote shard {uri} needs data.cache_dir")
        cache = self.cache_dir / shard_set.fingerprint[:16]
        try:
            return fetch_to_cache(uri, cache, shard_set.names[i], shard_set.sha256[i] or None)
        except (FileNotFoundError, PermissionError) as e:
            # not retried: say what the server said (HTTP 404/403) once, not the URI twice
            what = str(e) if str(e).startswith(uri) else f"{uri}: {type(e).__name__} ({e})"
            raise DataError(f"shard {what} (listed in the manifest of {shard_set.location})") from None
