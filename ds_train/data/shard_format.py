"""The on-disk shard format: webdataset tar files of packed token blocks, plus one manifest.

A shard `train-000012.tar` holds members `<key>.tokens.npy` (a 2-D array of packed rows,
`[rows, seq_len + 1]`, uint16 or uint32) and `<key>.json` (the document boundaries of those rows:
for each row, the columns where a document starts). Many rows per member keep tar overhead
negligible; any webdataset or `tar` user can read the files.

`index.json` beside the shards is the manifest: per shard its rows, tokens, documents, bytes and
sha256, plus the seq_len, dtype and tokenizer fingerprint of the whole set. It is the only listing
a training job reads.
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

MANIFEST = "index.json"
FORMAT = "ds_train.shards/1"
ROWS_MEMBER_SUFFIX = ".tokens.npy"
META_MEMBER_SUFFIX = ".json"
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


class ShardWriter:
    """Write packed rows into fixed-size tar shards named `<prefix>-<index:06d>.tar`.

    Rows arrive in order with their document starts; a shard closes after `rows_per_shard` rows.
    The writer is deterministic: same rows, same bytes.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        prefix: str,
        seq_len: int,
        dtype: np.dtype,
        rows_per_shard: int,
        rows_per_member: int,
        first_index: int = 0,
    ):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.prefix, self.seq_len, self.dtype = prefix, seq_len, np.dtype(dtype)
        self.rows_per_shard, self.rows_per_member = rows_per_shard, rows_per_member
        self.index = first_index
        self.stats: list[ShardStats] = []
        self._rows: list[np.ndarray] = []
        self._starts: list[list[int]] = []
        self._doc_lengths: list[int] = []

    def add(self, row: np.ndarray, doc_starts: list[int], finished_doc_lengths: list[int] = ()) -> None:
        """One packed row of seq_len + 1 tokens, the columns where documents start in it, and the
        lengths of documents that ended in it (for the manifest's histogram)."""
        if row.shape != (self.seq_len + 1,):
            raise ValueError(f"row has shape {row.shape}, expected ({self.seq_len + 1},)")
        self._rows.append(row.astype(self.dtype, copy=False))
        self._starts.append(list(doc_starts))
        self._doc_lengths.extend(finished_doc_lengths)
        if len(self._rows) == self.rows_per_shard:
            self.flush()

    def flush(self) -> None:
        if not self._rows:
            return
        import webdataset as wds

        name = f"{self.prefix}-{self.index:06d}.tar"
        tmp = self.out_dir / f".{name}.tmp"
        rows = np.stack(self._rows)
        with open(tmp, "wb") as fh:
            writer = wds.TarWriter(fh, mtime=FIXED_MTIME)
            for m, lo in enumerate(range(0, len(rows), self.rows_per_member)):
                hi = min(lo + self.rows_per_member, len(rows))
                writer.write(
                    {
                        "__key__": f"{self.prefix}-{self.index:06d}-{m:05d}",
                        "tokens.npy": rows[lo:hi],
                        "json": {"rows": hi - lo, "first_row": lo, "doc_starts": self._starts[lo:hi]},
                    }
                )
            writer.close()
        os.replace(tmp, self.out_dir / name)
        documents = sum(len(s) for s in self._starts)
        self.stats.append(
            ShardStats(
                name=name,
                rows=len(rows),
                tokens=int(rows.size),
                documents=documents,
                bytes=(self.out_dir / name).stat().st_size,
                sha256=file_sha256(self.out_dir / name),
                doc_length_hist=length_histogram(self._doc_lengths),
            )
        )
        self.index += 1
        self._rows, self._starts, self._doc_lengths = [], [], []


def length_histogram(lengths: list[int]) -> list[int]:
    """Counts of document lengths in buckets [1, 2), [2, 4), [4, 8), ... (bucket i: 2^i ≤ len < 2^(i+1))."""
    if not lengths:
        return []
    buckets = np.floor(np.log2(np.maximum(np.asarray(lengths), 1))).astype(int)
    return np.bincount(buckets).tolist()


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


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


def read_members(path: str | os.PathLike, seq_len: int, dtype: np.dtype) -> list[Member]:
    """Where each block of rows lies inside a shard, from the tar headers (reads ~1 KB per member).

    Raises ValueError naming the shard and byte offset when the file is truncated or malformed.
    """
    members: list[Member] = []
    size = os.path.getsize(path)
    first_row = 0
    try:
        with tarfile.open(path, "r:") as tf:
            for info in tf:
                if not info.name.endswith(ROWS_MEMBER_SUFFIX):
                    continue
                if info.offset_data + info.size > size:
                    raise ValueError(
                        f"{path}: member {info.name} at byte {info.offset_data} runs past the "
                        f"end of the file ({size} bytes): truncated shard"
                    )
                with open(path, "rb") as fh:
                    fh.seek(info.offset_data)
                    head = fh.read(min(info.size, 4096))
                hlen, dt, shape = parse_npy_header(head)
                if len(shape) != 2 or shape[1] != seq_len + 1 or dt != dtype:
                    raise ValueError(
                        f"{path}: member {info.name} at byte {info.offset_data} holds {dt}{list(shape)}, "
                        f"expected {np.dtype(dtype).name}[rows, {seq_len + 1}]"
                    )
                if hlen + shape[0] * shape[1] * dt.itemsize != info.size:
                    raise ValueError(
                        f"{path}: member {info.name} at byte {info.offset_data} has the wrong size"
                    )
                members.append(Member(info.offset_data + hlen, shape[0], first_row))
                first_row += shape[0]
    except tarfile.TarError as e:
        raise ValueError(f"{path}: not a readable tar file ({e})") from None
    return members
