"""Phase 1 of the sharder: one input piece → its token stream files (see token_stream.py).

Documents are read in order, tokenized a batch at a time, routed to train or valid by a hash of
their text, and appended to that split's files with their separator. Memory is bounded by the
batch; the files appear under their final names only when the whole piece is done, so a task that
died half-way leaves nothing a later merge could mistake for finished work.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ds_train.data.corpus_pieces import Piece
from ds_train.data.corpus_reader import iter_piece_documents
from ds_train.data.token_stream import piece_files

TOKENIZE_BATCH = 512
ProgressFn = Callable[[int, int], None]  # (documents, tokens) just done


def is_valid_doc(text: str, fraction: float) -> bool:
    """Whether a document is held out: a hash of its text, so independent of order and workers."""
    if fraction <= 0:
        return False
    h = int.from_bytes(hashlib.blake2b(text.encode("utf-8", "replace"), digest_size=8).digest(), "little")
    return h / 2**64 < fraction


# A document longer than this is tokenized in chunks cut before a space between two words. The Rust
# tokenizer keeps ~400 bytes per token of a text it encodes (token strings, offsets, masks), so one
# 27 MB document (a log, a dump) peaked at 3.4 GB in a worker (data audit, 2026-12-07). Such a cut
# changes no token for byte-level BPE (the space starts the next word's token), WordPiece or
# Metaspace; only a chunk with no such space at all is cut mid-word (a base64 blob), rarely.
CHUNK_CHARS = 1 << 20


class BatchEncoder:
    """Token ids of a batch of texts, without special tokens.

    Calls the Rust tokenizer directly when there is one: the transformers wrapper builds a
    BatchEncoding and attention masks we do not need (about a third of the time on short texts).
    Documents over `chunk_chars` are encoded a chunk at a time (CHUNK_CHARS) and come back as int64
    arrays (8 bytes a token, not a Python list's 36).
    """

    def __init__(self, tokenizer, chunk_chars: int = CHUNK_CHARS):
        self.tokenizer = tokenizer
        self.chunk_chars = chunk_chars
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None and (backend.truncation or backend.padding):
            # tokenizer.json may carry the model's truncation (all-MiniLM-L6-v2's: 128 tokens), which
            # the Rust tokenizer applies to every document when called directly (the transformers
            # wrapper turns it off unless asked): a copy without it, the caller's left as it was
            backend = type(backend).from_str(backend.to_str())
            backend.no_truncation()
            backend.no_padding()
        self._fast = getattr(backend, "encode_batch_fast", None) or getattr(backend, "encode_batch", None)

    def __call__(self, texts: list[str]) -> list:
        long = {i for i, t in enumerate(texts) if len(t) > self.chunk_chars}
        ids = self._encode([t for i, t in enumerate(texts) if i not in long])
        if not long:
            return ids
        short = iter(ids)
        return [self._encode_long(t) if i in long else next(short) for i, t in enumerate(texts)]

    def _encode(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        if self._fast is not None:
            return [e.ids for e in self._fast(texts, add_special_tokens=False)]
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def _encode_long(self, text: str) -> np.ndarray:
        parts = [
            np.asarray(self._encode([chunk])[0], dtype=np.int64)
            for chunk in text_chunks(text, self.chunk_chars)
        ]
        return np.concatenate(parts)


_WORD_GAP = re.compile(r"(?<=\S) (?=\S)")  # one space between two words: a token boundary for every scheme


def text_chunks(text: str, size: int):
    """`text` in pieces of at most `size` characters, each cut just before the last single space
    between two words in the second half of its span (runs of whitespace and newlines tokenize
    differently when split), or at `size` when there is none."""
    start = 0
    while len(text) - start > size:
        end = start + size
        cut = end
        for m in _WORD_GAP.finditer(text, start + size // 2, end):
            cut = m.start()
        yield text[start:cut]
        start = cut
    yield text[start:]


def done_marker(work_dir: str | os.PathLike, index: int) -> Path:
    return Path(work_dir) / f"piece-{index:06d}.done.json"


def tokenize_piece(
    piece: Piece,
    work_dir: str | os.PathLike,
    encoder: BatchEncoder,
    *,
    separator: int,
    dtype: np.dtype,
    splits: list[str],
    valid_fraction: float,
    text_field: str,
    plan_id: str,
    bos: int | None = None,
    progress: ProgressFn | None = None,
) -> dict:
    """Tokenize `piece` into `work_dir`; returns (and records) its per-split document/token counts.
    Each document is followed by `separator` and, when `bos` is given, preceded by it."""
    dtype = np.dtype(dtype)
    finals = {s: piece_files(work_dir, piece.index, s) for s in splits}
    tmp = {s: tuple(p.with_name(p.name + f".tmp{os.getpid()}") for p in finals[s]) for s in splits}
    marker = done_marker(work_dir, piece.index)
    marker_tmp = marker.with_name(marker.name + f".tmp{os.getpid()}")
    handles: dict = {}
    counts = {s: {"documents": 0, "tokens": 0} for s in splits}
    # Everything from the first file opened to the marker written is inside the try: a stop (the
    # pool's SIGTERM when another worker fails) may land anywhere, and must leave no temporary file
    try:
        for s in splits:
            handles[s] = (open(tmp[s][0], "wb"), open(tmp[s][1], "wb"))
        docs = iter_piece_documents(piece, text_field)
        while batch := list(itertools.islice(docs, TOKENIZE_BATCH)):
            ids = encoder(batch)
            if valid_fraction > 0:
                held = [is_valid_doc(t, valid_fraction) for t in batch]
                groups = {
                    "train": [x for x, v in zip(ids, held) if not v],
                    "valid": [x for x, v in zip(ids, held) if v],
                }
            else:
                groups = {"train": ids}
            for split, group in groups.items():
                if group:
                    _append(group, handles[split], counts[split], separator, dtype, bos)
            if progress is not None:
                progress(len(batch), sum(len(x) + _framing_tokens(bos) for x in ids))
        _close(handles)
        for s in splits:
            for t, f in zip(tmp[s], finals[s]):
                os.replace(t, f)
        record = {"index": piece.index, "plan": plan_id, "source": piece.describe(), "splits": counts}
        marker_tmp.write_text(json.dumps(record))
        os.replace(marker_tmp, marker)  # the piece counts as done from here on
    except BaseException:
        # bad input (or a stop) half-way: nothing of this attempt may stay in the work directory
        _close(handles)
        for t in [*itertools.chain.from_iterable(tmp.values()), marker_tmp]:
            t.unlink(missing_ok=True)
        raise
    return record


def _framing_tokens(bos: int | None) -> int:
    """Tokens added around each document: its separator, and its BOS if any."""
    return 1 if bos is None else 2


def _close(handles: dict) -> None:
    for fh in itertools.chain.from_iterable(handles.values()):
        fh.close()


def _append(
    group: list[list[int]], files, count: dict, separator: int, dtype: np.dtype, bos: int | None = None
) -> None:
    added = _framing_tokens(bos)
    lengths = np.fromiter((len(x) + added for x in group), dtype=np.int64, count=len(group))
    ends = np.cumsum(lengths)
    flat = np.empty(int(ends[-1]), dtype=dtype)
    framing = np.zeros(len(flat), dtype=bool)
    framing[ends - 1] = True
    flat[ends - 1] = separator
    if bos is not None:
        framing[ends - lengths] = True
        flat[ends - lengths] = bos
    flat[~framing] = np.fromiter(
        itertools.chain.from_iterable(group), dtype=dtype, count=len(flat) - added * len(group)
    )
    starts = ends - lengths + count["tokens"]
    files[0].write(flat.tobytes())
    files[1].write(starts.tobytes())
    count["documents"] += len(group)
    count["tokens"] += len(flat)
