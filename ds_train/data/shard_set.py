"""A shard set: the manifest of one corpus split, wherever its shards live.

Accepted forms of `data.train` / `data.valid` entries:
- a directory holding `index.json`, or the path of an `index.json`
- a brace pattern `dir/train-{000000..000099}.tar` (the manifest beside it, restricted to those)
- `http(s)://host/dir`, `s3://bucket/dir` or any fsspec URL (the manifest at `<dir>/index.json`),
  or a brace pattern under such a URL
- `pipe:COMMAND` where COMMAND writes the named file to stdout and contains `{shard}`, e.g.
  `pipe:aws s3 cp s3://bucket/corpus/{shard} -`; the manifest is read with {shard}=index.json.

Only the manifest is read at start-up: one listing per job, read by rank 0 and broadcast.
Per shard only a name, a row count and a checksum are kept (numpy arrays), so a 100,000-shard
set costs a few MB per rank.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ds_train.data.shard_format import FORMAT, MANIFEST


class DataError(ValueError):
    """A problem with a shard set or a shard, reported with the shard's name (and offset)."""


@dataclass
class ShardSet:
    location: str  # directory, URL prefix or pipe template the shard names are joined to
    names: list[str]
    rows: np.ndarray  # int64 rows per shard
    sha256: list[str]
    seq_len: int
    dtype: np.dtype
    tokenizer: dict
    fingerprint: str
    sft: dict | None = None  # SFT sets (`ds-train shard --sft`): how the examples were rendered
    bos_token_id: int | None = None  # the BOS starting every document (`ds-train shard --bos`), if any

    @property
    def num_rows(self) -> int:
        return int(self.rows.sum())

    @property
    def is_local(self) -> bool:
        from ds_train.data.remote import is_remote

        return not is_remote(self.location)

    def shard_uri(self, i: int) -> str:
        return join_location(self.location, self.names[i])

    def describe(self) -> str:
        return (
            f"{self.location} ({len(self.names)} shards, {self.num_rows} rows of {self.seq_len + 1} tokens)"
        )


def join_location(location: str, name: str) -> str:
    if location.startswith("pipe:"):
        return location.replace("{shard}", name)
    if location.startswith("file://"):
        location = location[len("file://") :]
    if "://" in location:
        return location.rstrip("/") + "/" + name
    return str(Path(location) / name)


def load_shard_set(spec: str) -> ShardSet:
    """Read the manifest of one shard set (see the module docstring for the accepted forms)."""
    location, selected = _split_spec(str(spec))
    manifest_uri = join_location(location, MANIFEST)
    try:
        raw = read_text(manifest_uri)
    except FileNotFoundError:
        raise DataError(
            f"no shard manifest at {manifest_uri} (create shards with `ds-train shard`)"
        ) from None
    except OSError as e:
        raise DataError(f"cannot read the shard manifest {manifest_uri}: {e}") from None
    try:
        manifest = json.loads(raw)
    except json.JSONDecodeError as e:
        raise DataError(f"{manifest_uri}: not valid JSON ({e})") from None
    try:
        return shard_set_from_manifest(location, manifest, selected, manifest_uri)
    except DataError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as e:  # a field missing or of the wrong type
        raise DataError(
            f"{manifest_uri}: not a shard manifest ds-train can read ({type(e).__name__}: {e}); "
            "re-create the shards with `ds-train shard`, or check the file was not edited"
        ) from None


def shard_set_from_manifest(
    location: str, manifest: dict, selected: list[str] | None = None, source: str = "manifest"
) -> ShardSet:
    if manifest.get("format") != FORMAT:
        raise DataError(f"{source}: unknown format {manifest.get('format')!r} (expected {FORMAT})")
    shards = manifest["shards"]
    if selected is not None:
        by_name = {s["name"]: s for s in shards}
        missing = [n for n in selected if n not in by_name]
        if missing:
            raise DataError(
                f"{source}: the pattern names shards missing from the manifest, e.g. {missing[0]}"
            )
        shards = [by_name[n] for n in selected]
    if not shards:
        raise DataError(f"{source}: the shard set is empty")
    names = [s["name"] for s in shards]
    rows = np.asarray([s["rows"] for s in shards], dtype=np.int64)
    sha = [s.get("sha256", "") for s in shards]
    h = hashlib.sha256()
    h.update(f"{manifest['seq_len']}|{manifest['dtype']}|{manifest['tokenizer'].get('sha256')}".encode())
    for n, r, s in zip(names, rows.tolist(), sha):
        h.update(f"|{n}:{r}:{s}".encode())
    return ShardSet(
        location=location,
        names=names,
        rows=rows,
        sha256=sha,
        seq_len=int(manifest["seq_len"]),
        dtype=np.dtype(manifest["dtype"]),
        tokenizer=manifest["tokenizer"],
        fingerprint=h.hexdigest(),
        sft=manifest.get("sft"),
        bos_token_id=manifest.get("bos_token_id"),
    )


def _split_spec(spec: str) -> tuple[str, list[str] | None]:
    """(location, selected shard names or None) from a directory/manifest/pattern/URL spec."""
    if spec.startswith("pipe:"):
        if "{shard}" not in spec:
            raise DataError(f"pipe source must contain {{shard}} where the shard name goes: {spec}")
        return spec, None
    if spec.endswith(MANIFEST):
        return spec[: -len(MANIFEST)].rstrip("/") or ".", None
    if "{" in spec and "}" in spec:
        import braceexpand

        expanded = list(braceexpand.braceexpand(spec))
        parents = {e.rsplit("/", 1)[0] if "/" in e else "." for e in expanded}
        if len(parents) != 1:
            raise DataError(f"a brace pattern must stay within one directory: {spec}")
        return parents.pop(), [e.rsplit("/", 1)[-1] for e in expanded]
    if spec.endswith(".tar"):
        parent, _, name = spec.rpartition("/")
        return parent or ".", [name]
    return spec.rstrip("/") if "://" in spec else spec, None


def read_text(uri: str) -> str:
    from ds_train.data.remote import read_bytes

    data = read_bytes(uri)
    try:
        return data.decode()
    except UnicodeDecodeError as e:
        raise DataError(f"{uri}: not UTF-8 text ({e})") from None


def parse_sources(value) -> list[tuple[str, float]]:
    """`data.train` as [(spec, weight)]: a string, a list of strings, or a list of {path, weight}."""
    if isinstance(value, (str, os.PathLike)):
        return [(str(value), 1.0)]
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not value:
        raise DataError(f"a data source must be a path/URL or a list of {{path, weight}}, got {value!r}")
    out = []
    for item in value:
        if isinstance(item, (str, os.PathLike)):
            out.append((str(item), 1.0))
        elif isinstance(item, dict) and "path" in item:
            unknown = set(item) - {"path", "weight", "name"}
            if unknown:
                raise DataError(
                    f"unknown key(s) {sorted(unknown)} in data source {item} (allowed: path, weight, name)"
                )
            try:
                weight = float(item.get("weight", 1.0))
            except (TypeError, ValueError):
                weight = math.nan  # refused below, in the same words
            if not 0 < weight < math.inf:
                raise DataError(f"data source weight must be > 0 (a number): {item}")
            out.append((str(item["path"]), weight))
        else:
            raise DataError(f"a data source entry must be a path or {{path, weight}}, got {item!r}")
    return out


def source_names(value) -> list[str]:
    """A short name per source of `parse_sources(value)`, for per-set figures (one validation
    loss per data.valid set): the entry's `name`, else the shortest tail of its path that tells it
    from the others (`web/valid`, `code/valid`; `index.json` and brace patterns left out)."""
    sources = parse_sources(value)
    items = value if isinstance(value, list) else [value]
    given = [item.get("name") if isinstance(item, dict) else None for item in items]
    parts = [_path_parts(path) for path, _ in sources]
    names = []
    for i, own in enumerate(parts):
        if given[i] is not None:
            names.append(str(given[i]))
            continue
        others = [p for j, p in enumerate(parts) if j != i]
        k = 1
        while k < len(own) and any(p[-k:] == own[-k:] for p in others):
            k += 1
        name = "/".join(own[-k:]) or str(i)
        twice = sum(n == name or n.startswith(f"{name}#") for n in names)  # the same path listed again
        names.append(f"{name}#{twice + 1}" if twice else name)
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise DataError(f"data sources share the name(s) {repeated}: give each a distinct `name`")
    return names


def _path_parts(spec: str) -> list[str]:
    spec = spec.split("://", 1)[-1].removeprefix("pipe:")
    parts = [p for p in spec.replace("\\", "/").split("/") if p and p != MANIFEST]
    if parts and "{" in parts[-1]:  # a brace pattern: the directory names the set
        parts = parts[:-1]
    return parts
