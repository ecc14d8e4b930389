"""Pack whole SFT examples into fixed-width rows, keeping document boundaries.

Unlike pretraining's stream packing (data/packing.py), an example is never cut across rows: it goes
into the first open row with room for it (first-fit over a bounded set of open rows, in input
order, so the result is deterministic). Per token the row records the position within its example;
positions restarting at 0 are how transformers sees separate sequences in one row (block-diagonal
attention, `masking_utils.find_packed_sequence_indices`). An example's first token is never a loss
target: it would be predicted from the previous example's last token.
"""

from __future__ import annotations

import numpy as np

MAX_OPEN_ROWS = 64  # rows still accepting examples; more packs tighter and costs a scan per example


class ExamplePacker:
    def __init__(self, width: int, pad_id: int, *, pack: bool = True):
        self.width, self.pad_id, self.pack = width, pad_id, pack
        self._open: list[list[tuple[np.ndarray, np.ndarray, int]]] = []
        self._free: list[int] = []
        self._closed: list[list[tuple[np.ndarray, np.ndarray, int]]] = []

    def add(self, ids: np.ndarray, targets: np.ndarray, origin: int) -> None:
        """One example (at most `width` tokens) with its per-token target flags and an origin id."""
        n = len(ids)
        if not 0 < n <= self.width:
            raise ValueError(f"example of {n} tokens does not fit a row of {self.width}")
        item = (np.asarray(ids), np.asarray(targets, dtype=bool), origin)
        if self.pack:
            for i, free in enumerate(self._free):
                if n <= free:
                    self._open[i].append(item)
                    self._free[i] -= n
                    return
        self._open.append([item])
        self._free.append(self.width - n)
        if not self.pack or len(self._open) > MAX_OPEN_ROWS:
            self._closed.append(self._open.pop(0))
            self._free.pop(0)

    def finish(self) -> dict[str, np.ndarray]:
        """tokens, targets (uint8), positions, origin (first example of each row), examples per row."""
        rows = self._closed + self._open
        self._closed, self._open, self._free = [], [], []
        r, w = len(rows), self.width
        tokens = np.full((r, w), self.pad_id, dtype=np.int64)
        targets = np.zeros((r, w), dtype=np.uint8)
        positions = np.zeros((r, w), dtype=np.int64)
        origin = np.zeros(r, dtype=np.int64)
        count = np.zeros(r, dtype=np.int32)
        for i, row in enumerate(rows):
            col = 0
            for ids, flags, _ in row:
                n = len(ids)
                tokens[i, col : col + n] = ids
                targets[i, col : col + n] = flags
                targets[i, col] = 0
                positions[i, col : col + n] = np.arange(n)
                col += n
            positions[i, col:] = np.arange(w - col)  # the padding is one more (never targeted) sequence
            origin[i], count[i] = row[0][2], len(row)
        return {
            "tokens": tokens,
            "targets": targets,
            "positions": positions,
            "origin": origin,
            "examples": count,
        }
