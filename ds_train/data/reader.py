"""Random access to packed rows inside tar shards.

webdataset streams tar files front to back and cannot seek, which is why it has no mid-epoch
resume (webdataset #234, #271). Our members are uncompressed .npy arrays, so a row is a fixed
number of bytes at a known offset: we read the tar headers once per shard (tarfile, ~1 KB per
member), memory-map the file and copy rows straight out of it (Megatron's indexed-dataset idea
applied to webdataset shards). Remote shards are first cached locally (see remote.py).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path

import numpy as np

from ds_train.data.remote import fetch_to_cache
from ds_train.data.shard_format import read_members
from ds_train.data.shard_set import DataError, ShardSet

MAX_OPEN_SHARDS = 64


class _OpenShard:
    def __init__(self, path: Path, shard_set: ShardSet, index: int):
        members = read_members(path, shard_set.seq_len, shard_set.dtype)
        rows = sum(m.rows for m in members)
        if rows != shard_set.rows[index]:
            raise ValueError(f"{path}: holds {rows} rows but the manifest says {shard_set.rows[index]}")
        self.path = path
        self.first_rows = np.asarray([m.first_row for m in members], dtype=np.int64)
        self.offsets = np.asarray([m.data_offset for m in members], dtype=np.int64)
        self.mm = np.memmap(path, dtype=np.uint8, mode="r")
        self.row_bytes = (shard_set.seq_len + 1) * shard_set.dtype.itemsize

    def byte_offset(self, rows: np.ndarray) -> np.ndarray:
        m = np.searchsorted(self.first_rows, rows, side="right") - 1
        return self.offsets[m] + (rows - self.first_rows[m]) * self.row_bytes


class RowReader:
    """Reads rows of several shard sets; one per DataLoader worker (opened lazily, after fork)."""

    def __init__(self, sources: list[ShardSet], cache_dir: str | os.PathLike | None):
        self.sources = sources
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self._open: OrderedDict[tuple[int, int], _OpenShard] = OrderedDict()

    def read(self, source: np.ndarray, shard: np.ndarray, row: np.ndarray) -> np.ndarray:
        seq_len, dtype = self.sources[0].seq_len, self.sources[0].dtype
        out = np.empty((len(row), seq_len + 1), dtype=dtype)
        keys = source * (1 << 40) + shard
        for key in np.unique(keys):
            sel = np.nonzero(keys == key)[0]
            s, i = int(source[sel[0]]), int(shard[sel[0]])
            opened = self._shard(s, i)
            for j, offset in zip(sel, opened.byte_offset(row[sel])):
                try:
                    out[j] = np.frombuffer(opened.mm, dtype=dtype, count=seq_len + 1, offset=int(offset))
                except ValueError:
                    raise DataError(
                        f"shard {opened.path}: row {row[j]} at byte {offset} is past the end "
                        "of the file: truncated shard"
                    ) from None
        return out

    def _shard(self, s: int, i: int) -> _OpenShard:
        key = (s, i)
        if key in self._open:
            self._open.move_to_end(key)
            return self._open[key]
        shard_set = self.sources[s]
        uri = shard_set.shard_uri(i)
        try:
            if shard_set.is_local:
                path = Path(uri)
                if not path.is_file():
                    raise DataError(
                        f"shard {uri} is missing (listed in the manifest of {shard_set.location})"
                    )
            else:
                if self.cache_dir is None:
                    raise DataError(f"remote shard {uri} needs data.cache_dir")
                cache = self.cache_dir / shard_set.fingerprint[:16]
                path = fetch_to_cache(uri, cache, shard_set.names[i], shard_set.sha256[i] or None)
            opened = _OpenShard(path, shard_set, i)
        except DataError:
            raise
        except (OSError, ValueError) as e:
            raise DataError(f"shard {uri}: {e}") from None
        self._open[key] = opened
        while len(self._open) > MAX_OPEN_SHARDS:
            self._open.popitem(last=False)
        return opened
