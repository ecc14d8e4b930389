"""The on-disk shard format: webdataset tar files of packed token blocks, plus one manifest.

A shard `train-000012.tar` holds members `<key>.tokens.npy` (a 2-D array of packed rows,
`[rows, seq_len + 1]`, uint16 or uint32) and `<key>.json` (the document boundaries of those rows:
for each row, the input columns 0 ≤ c < seq_len where a document starts). Many rows per member
keep tar overhead negligible; any webdataset or `tar` user can read the files (docs/data.md).

`index.json` beside the shards is the manifest: per shard its rows, tokens, documents, bytes and
sha256, plus the seq_len, dtype and tokenizer fingerprint of the whole set. It is the only listing
a training job reads.

SFT shard sets (`ds-train shard --sft`, sft_sharding.py) add a member `<key>.mask.npy` per block:
uint8 `[rows, seq_len + 1]`, 1 where the token is a loss target (a response token), and their
manifest carries an `sft` entry. Pretraining readers ignore the extra member.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ds_train.checksum import HashingWriter

MANIFEST = "index.json"
FORMAT = "ds_train.shards/1"
ROWS_MEMBER_SUFFIX = ".tokens.npy"
META_MEMBER_SUFFIX = ".json"
MASK_MEMBER_SUFFIX = ".mask.npy"
FIXED_MTIME = 0  # reproducible tar bytes: the same input gives the same sha256


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


@dataclass
class ShardStats:
    name: str
    rows: int
    tokens: int
    documents: int
    bytes: int
    sha256: str
    doc_length_hist: list[int] = field(default_factory=list)  # counts per power-of-two bucket

    def to_json(self) -> dict:
        return self.__dict__.copy()


def write_shard(
    out_dir: str | os.PathLike,
    name: str,
    rows: np.ndarray,
    doc_starts: list[list[int]],
    rows_per_member: int,
    doc_lengths: np.ndarray | list[int] = (),
    masks: np.ndarray | None = None,
) -> ShardStats:
    """Write one shard `<out_dir>/<name>` (atomically: a temporary name, then a rename).

    Deterministic: the same rows give the same bytes (fixed mtime, user, order), so the sha256 in
    the manifest identifies the content whatever machine or worker wrote it. `masks` (SFT sets):
    the per-token loss mask of `rows`, written as `<key>.mask.npy` beside each block.
    """
    import webdataset as wds

    out_dir = Path(out_dir)
    stem = name.removesuffix(".tar")
    tmp = out_dir / f".{name}.tmp{os.getpid()}"
    with open(tmp, "wb") as raw:
        fh = HashingWriter(raw)
        writer = wds.TarWriter(fh, mtime=FIXED_MTIME)
        for m, lo in enumerate(range(0, len(rows), rows_per_member)):
            hi = min(lo + rows_per_member, len(rows))
            sample = {
                "__key__": f"{stem}-{m:05d}",
                "tokens.npy": rows[lo:hi],
                "json": {"rows": hi - lo, "first_row": lo, "doc_starts": doc_starts[lo:hi]},
            }
            if masks is not None:
                sample["mask.npy"] = masks[lo:hi]
            writer.write(sample)
        writer.close()
    os.replace(tmp, out_dir / name)
    return ShardStats(
        name=name,
        rows=len(rows),
        tokens=int(rows.size),
        documents=sum(len(s) for s in doc_starts),
        bytes=fh.size,
        sha256=fh.hexdigest(),
        doc_length_hist=length_histogram(doc_lengths),
    )


def length_histogram(lengths) -> list[int]:
    """Counts of document lengths in buckets [1, 2), [2, 4), [4, 8), ... (bucket i: 2^i ≤ len < 2^(i+1))."""
    if len(lengths) == 0:
        return []
    buckets = np.floor(np.log2(np.maximum(np.asarray(lengths), 1))).astype(int)
    return np.bincount(buckets).tolist()


def write_manifest(
    out_dir: str | os.PathLike,
    *,
    split: str,
    seq_len: int,
    dtype: np.dtype,
    tokenizer: dict,
    shards: list[ShardStats | dict],
    extra: dict | None = None,
) -> dict:
    entries = [s.to_json() if isinstance(s, ShardStats) else s for s in shards]
    hist: list[int] = []
    for e in entries:
        for i, c in enumerate(e.get("doc_length_hist", [])):
            hist.extend([0] * (i + 1 - len(hist)))
            hist[i] += c
    manifest = {
        "format": FORMAT,
        "split": split,
        "seq_len": seq_len,
        "dtype": np.dtype(dtype).name,
        "tokenizer": tokenizer,
        "total_rows": sum(e["rows"] for e in entries),
        "total_tokens": sum(e["tokens"] for e in entries),
        "total_documents": sum(e["documents"] for e in entries),
        "doc_length_hist": hist,
        "shards": entries,
        **(extra or {}),
    }
    path = Path(out_dir) / MANIFEST
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, path)
    return manifest


def tokenizer_fingerprint(tokenizer) -> dict:
    """What identifies a tokenizer for resume checks: a hash of its full serialisation."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        # truncation/padding are call-time settings that encoding mutates, not part of the vocabulary
        spec = {k: v for k, v in json.loads(backend.to_str()).items() if k not in ("truncation", "padding")}
        serial = json.dumps(spec, sort_keys=True)
    else:
        serial = json.dumps(tokenizer.get_vocab(), sort_keys=True)
    return {
        "name_or_path": str(getattr(tokenizer, "name_or_path", "")),
        "sha256": hashlib.sha256(serial.encode()).hexdigest(),
        "vocab_size": len(tokenizer),
        "eos_token_id": tokenizer.eos_token_id,
    }


# --- reading ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Member:
    data_offset: int  # byte offset of the first row inside the tar file
    rows: int
    first_row: int


def parse_npy_header(buf: bytes) -> tuple[int, np.dtype, tuple[int, ...]]:
    """(header length, dtype, shape) of an .npy payload; shards never need pickle."""
    fh = io.BytesIO(buf)
    version = np.lib.format.read_magic(fh)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
    else:
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
    if fortran or dtype.hasobject:
        raise ValueError("unsupported .npy layout (Fortran order or object dtype)")
    return fh.tell(), dtype, shape


class ShardReadError(ValueError):
    """A shard that is truncated or malformed; `members` are the intact ones before `offset`."""

    def __init__(self, message: str, offset: int, members: list[Member]):
        super().__init__(message)
        self.offset, self.members = offset, members


def read_members(path: str | os.PathLike, seq_len: int, dtype: np.dtype) -> list[Member]:
    """Where each block of rows lies inside a shard, from the tar headers (reads ~1 KB per member).

    Raises ShardReadError naming the shard and byte offset when the file is truncated or malformed.
    """
    members: list[Member] = []
    size = os.path.getsize(path)
    first_row = 0
    offset = 0
    try:
        with open(path, "rb") as fh, tarfile.open(fileobj=fh, mode="r:") as tf:
            for info in tf:
                offset = info.offset
                if not info.name.endswith(ROWS_MEMBER_SUFFIX):
                    continue
                if info.offset_data + info.size > size:
                    raise ShardReadError(
                        f"{path}: member {info.name} at byte {info.offset_data} runs past the "
                        f"end of the file ({size} bytes): truncated shard",
                        info.offset,
                        members,
                    )
                fh.seek(info.offset_data)
                head = fh.read(min(info.size, 4096))
                try:
                    hlen, dt, shape = parse_npy_header(head)
                # numpy parses the header dict with Python's tokenizer and literal_eval: damaged
                # bytes raise ValueError, SyntaxError, tokenize.TokenError, TypeError, ...
                except Exception as e:
                    raise ShardReadError(
                        f"{path}: member {info.name} at byte {info.offset_data} is not a valid .npy array ({e})",
                        info.offset,
                        members,
                    ) from None
                if len(shape) != 2 or shape[1] != seq_len + 1 or dt != dtype:
                    raise ShardReadError(
                        f"{path}: member {info.name} at byte {info.offset_data} holds {dt}{list(shape)}, "
                        f"expected {np.dtype(dtype).name}[rows, {seq_len + 1}]",
                        info.offset,
                        members,
                    )
                if hlen + shape[0] * shape[1] * dt.itemsize != info.size:
                    raise ShardReadError(
                        f"{path}: member {info.name} at byte {info.offset_data} has the wrong size",
                        info.offset,
                        members,
                    )
                members.append(Member(info.offset_data + hlen, shape[0], first_row))
                first_row += shape[0]
                offset = info.offset_data + info.size
    except tarfile.TarError as e:
        raise ShardReadError(
            f"{path}: not a readable tar file at byte {offset} ({e})", offset, members
        ) from None
    return members
