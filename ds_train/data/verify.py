"""Check a local shard set against its manifest: every shard present, of the listed size and
sha256, and structurally what the loader expects (rows, dtype, seq_len per member)."""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ds_train.checksum import file_sha256
from ds_train.data.shard_format import read_members
from ds_train.data.shard_set import DataError, ShardSet, load_shard_set


@dataclass
class ShardProblem:
    name: str
    problem: str


def verify_shard_set(
    spec: str,
    *,
    checksums: bool = True,
    threads: int = 4,
    on_shard: Callable[[], None] | None = None,
) -> tuple[ShardSet, list[ShardProblem]]:
    """(the shard set, the problems found); hashing runs in threads (hashlib releases the GIL)."""
    shard_set = load_shard_set(spec)
    if not shard_set.is_local:
        raise DataError(f"verify reads local shard sets only, not {shard_set.location}")
    sizes = _manifest_sizes(shard_set)

    def check(i: int) -> ShardProblem | None:
        try:
            return _check_one(shard_set, i, sizes.get(shard_set.names[i]), checksums)
        finally:
            if on_shard is not None:
                on_shard()

    with ThreadPoolExecutor(max(1, threads)) as pool:
        found = list(pool.map(check, range(len(shard_set.names))))
    return shard_set, [p for p in found if p is not None]


def _manifest_sizes(shard_set: ShardSet) -> dict[str, int]:
    import json

    from ds_train.data.shard_format import MANIFEST

    manifest = json.loads((Path(shard_set.location) / MANIFEST).read_text())
    return {s["name"]: s.get("bytes") for s in manifest["shards"]}


def _check_one(shard_set: ShardSet, i: int, size: int | None, checksums: bool) -> ShardProblem | None:
    name = shard_set.names[i]
    path = Path(shard_set.shard_uri(i))
    if not path.is_file():
        return ShardProblem(name, "missing")
    actual = os.path.getsize(path)
    if size is not None and actual != size:
        return ShardProblem(name, f"{actual} bytes, the manifest says {size}")
    try:
        members = read_members(path, shard_set.seq_len, np.dtype(shard_set.dtype))
    except ValueError as e:
        return ShardProblem(name, str(e))
    rows = sum(m.rows for m in members)
    if rows != shard_set.rows[i]:
        return ShardProblem(name, f"{rows} rows, the manifest says {shard_set.rows[i]}")
    if checksums and shard_set.sha256[i]:
        got = file_sha256(path)
        if got != shard_set.sha256[i]:
            return ShardProblem(name, f"sha256 {got[:12]}…, the manifest says {shard_set.sha256[i][:12]}…")
    return None
