"""Pack tokenized documents into rows of seq_len + 1 tokens.

Documents are concatenated, each followed by EOS, and cut into rows that overlap by one token
(row i = stream[i·L : i·L + L + 1]), so every token after the first is a target exactly once.
Each row records the columns where documents start, which the loader turns into per-document
position ids (and a block-diagonal attention mask). The last, partial row is padded with the
tokenizer's pad token, which the objective never uses as a target; without a pad token distinct
from EOS the partial row is dropped.

Two implementations of the same rule: `Packer` consumes documents one at a time (fine-tuning
packs a few thousand records with it); the functions at the end cut any range of rows straight
out of a token stream whose length is known in advance, which is what lets the sharder write
every shard independently, in parallel (see sharding.py). Tests check that both agree.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

RowSink = Callable[[np.ndarray, list[int], list[int]], None]  # (row, doc starts, finished doc lengths)


class Packer:
    def __init__(self, seq_len: int, eos_id: int, pad_id: int | None, sink: RowSink):
        self.seq_len, self.eos_id = seq_len, eos_id
        self.pad_id = pad_id if pad_id is not None and pad_id != eos_id else None
        self.sink = sink
        self._chunks: list[np.ndarray] = []
        self._buffered = 0
        self._base = 0  # stream offset of the first buffered token
        self._starts: list[int] = []  # stream offsets where documents start (not yet fully emitted)
        self._ends: list[tuple[int, int]] = []  # (stream offset of a document's EOS, its length)
        self.documents = 0
        self.tokens = 0

    def add(self, token_ids: list[int] | np.ndarray) -> None:
        """One document (without EOS; it is appended here)."""
        ids = np.asarray(token_ids, dtype=np.int64)
        start = self._base + self._buffered
        self._starts.append(start)
        self._ends.append((start + len(ids), len(ids) + 1))
        self._chunks.append(ids)
        self._chunks.append(np.asarray([self.eos_id], dtype=np.int64))
        self._buffered += len(ids) + 1
        self.documents += 1
        self.tokens += len(ids) + 1
        if self._buffered >= self.seq_len + 1:
            self._emit_full_rows()

    def finish(self) -> None:
        """Emit the last partial row (padded) if it holds at least one target."""
        self._emit_full_rows()
        if self._buffered > 1 and self.pad_id is not None:
            stream = np.concatenate(self._chunks)
            self._starts = [s for s in self._starts if s >= self._base]
            row = np.full(self.seq_len + 1, self.pad_id, dtype=np.int64)
            row[: len(stream)] = stream
            self._emit(row, self._base)
        self._chunks, self._buffered = [], 0

    def _emit_full_rows(self) -> None:
        if not self._chunks:
            return
        stream = np.concatenate(self._chunks) if len(self._chunks) > 1 else self._chunks[0]
        step = self.seq_len
        pos = 0
        while len(stream) - pos >= self.seq_len + 1:
            self._emit(stream[pos : pos + self.seq_len + 1], self._base + pos)
            pos += step
        # keep the overlap token: the last token of the emitted row starts the next one
        rest = stream[pos:]
        self._base += pos
        self._chunks = [rest] if len(rest) else []
        self._buffered = len(rest)

    def _emit(self, row: np.ndarray, offset: int) -> None:
        end = offset + self.seq_len + 1
        starts = [s - offset for s in self._starts if offset <= s < end]
        finished = [n for e, n in self._ends if offset <= e < end]
        self.sink(row, starts, finished)
        # forget what the next row (which starts at end - 1) can no longer contain
        self._starts = [s for s in self._starts if s >= end - 1]
        self._ends = [(e, n) for e, n in self._ends if e >= end]


# --- rows out of a stream of known length ----------------------------------------------------------


def effective_pad(eos_id: int, pad_id: int | None) -> int | None:
    """The pad token used for the last partial row, or None when the row is dropped."""
    return pad_id if pad_id is not None and pad_id != eos_id else None


def packed_row_count(total_tokens: int, seq_len: int, pad_id: int | None) -> int:
    """Rows `Packer` emits for a stream of `total_tokens` (documents and their EOS tokens)."""
    full = (total_tokens - 1) // seq_len if total_tokens > seq_len else 0
    rest = total_tokens - full * seq_len
    return full + (1 if pad_id is not None and rest > 1 else 0)


def cut_rows(tokens: np.ndarray, n_rows: int, seq_len: int, pad_id: int | None) -> np.ndarray:
    """Rows [0, n_rows) of the stream that starts with `tokens` (which holds every token those rows
    cover, fewer only at the end of the stream, where the last row is padded)."""
    width = seq_len + 1
    need = (n_rows - 1) * seq_len + width if n_rows else 0
    if len(tokens) < need:
        if pad_id is None:
            raise ValueError(f"{n_rows} rows need {need} tokens, got {len(tokens)} and no pad token")
        tokens = np.concatenate([tokens, np.full(need - len(tokens), pad_id, dtype=tokens.dtype)])
    windows = np.lib.stride_tricks.sliding_window_view(tokens[:need], width)[::seq_len]
    return np.ascontiguousarray(windows[:n_rows])


def row_doc_starts(starts: np.ndarray, first_pos: int, n_rows: int, seq_len: int) -> list[list[int]]:
    """For rows [0, n_rows) of a stream beginning at `first_pos`, the input columns (0 ≤ c <
    seq_len) where documents start, given the stream offsets `starts` of documents (sorted)."""
    local = np.asarray(starts, dtype=np.int64) - first_pos
    local = local[(local >= 0) & (local < n_rows * seq_len)]
    rows, cols = np.divmod(local, seq_len)
    bounds = np.searchsorted(rows, np.arange(n_rows + 1))
    cols_list = cols.tolist()
    return [cols_list[bounds[i] : bounds[i + 1]] for i in range(n_rows)]
