"""The global sample order: a pure function from a stream position to (source, shard, row).

The training stream is the concatenation of epochs; global batch b is positions
[b·G, (b+1)·G). Nothing here depends on the number of ranks or workers, so:
- every rank takes its slice of every global batch and all ranks run the same number of steps
  (the uneven-shard hang of webdataset + DDP cannot happen);
- every sample is seen exactly once per epoch (batches may straddle an epoch boundary);
- resuming needs one number, the samples consumed, and costs the same at 0% or 90% of an epoch
  (a seek: permutations are recomputed for the current window only);
- resuming on another world size with the same global batch sees the same global batches.

Per epoch e: shards are permuted with a generator seeded by (seed, e); consecutive groups of
`window` permuted shards have their rows permuted by (seed, e, window index). Several sources are
interleaved by a fixed pattern that tracks their weights (Megatron's blending, made periodic so
any position is O(1) to locate).
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

MIX_PERIOD = 10_000


class SampleOrder:
    """Order of one source's rows over endless epochs."""

    def __init__(
        self, rows_per_shard: np.ndarray, seed: int, shuffle: bool = True, window: int = 16, stream: int = 0
    ):
        self.rows = np.asarray(rows_per_shard, dtype=np.int64)
        if (self.rows <= 0).any():
            raise ValueError("every shard must hold at least one row")
        self.total = int(self.rows.sum())
        self.seed, self.shuffle, self.window, self.stream = seed, shuffle, max(1, window), stream
        self._epochs: OrderedDict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = OrderedDict()
        self._windows: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()

    def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard index, row within shard) for stream positions (≥ 0, may exceed one epoch)."""
        positions = np.asarray(positions, dtype=np.int64)
        shard = np.empty_like(positions)
        row = np.empty_like(positions)
        epochs, within = np.divmod(positions, self.total)
        for e in np.unique(epochs):
            sel = epochs == e
            perm, starts, window_starts = self._epoch(int(e))
            pos = within[sel]
            k = np.searchsorted(window_starts, pos, side="right") - 1
            s_out = np.empty_like(pos)
            r_out = np.empty_like(pos)
            for w in np.unique(k):
                wsel = k == w
                lo_shard = int(w) * self.window
                hi_shard = min(lo_shard + self.window, len(perm))
                local = pos[wsel] - window_starts[w]
                if self.shuffle:
                    local = self._window_perm(int(e), int(w), int(starts[hi_shard] - starts[lo_shard]))[local]
                flat = local + starts[lo_shard]
                j = np.searchsorted(starts, flat, side="right") - 1  # position in the permuted shard list
                s_out[wsel] = perm[j]
                r_out[wsel] = flat - starts[j]
            shard[sel] = s_out
            row[sel] = r_out
        return shard, row

    def epoch_of(self, position: int) -> int:
        return position // self.total

    def _epoch(self, e: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if e in self._epochs:
            self._epochs.move_to_end(e)
            return self._epochs[e]
        n = len(self.rows)
        perm = (
            np.random.default_rng([self.seed, self.stream, e]).permutation(n)
            if self.shuffle
            else np.arange(n)
        )
        starts = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(self.rows[perm], out=starts[1:])
        window_starts = starts[:: self.window][: -(-n // self.window)]
        self._epochs[e] = (perm, starts, window_starts)
        while len(self._epochs) > 2:
            self._epochs.popitem(last=False)
        return self._epochs[e]

    def _window_perm(self, e: int, w: int, size: int) -> np.ndarray:
        key = (e, w)
        if key not in self._windows:
            self._windows[key] = np.random.default_rng([self.seed, self.stream, e, w, 1]).permutation(size)
            while len(self._windows) > 4:
                self._windows.popitem(last=False)
        else:
            self._windows.move_to_end(key)
        return self._windows[key]


class MixtureOrder:
    """Interleave several sources by weight with a fixed periodic pattern.

    Slot j of each period goes to the source furthest below its share, so any window of the
    stream holds each source in proportion to its weight (±1 sample per period).
    """

    def __init__(self, orders: list[SampleOrder], weights: list[float], period: int = MIX_PERIOD):
        if len(orders) != len(weights) or not orders:
            raise ValueError("one weight per source")
        w = np.asarray(weights, dtype=np.float64)
        w = w / w.sum()
        self.orders = orders
        self.period = period if len(orders) > 1 else 1
        pattern = np.empty(self.period, dtype=np.int64)
        counts = np.zeros(len(orders))
        for j in range(self.period):
            k = int(np.argmax(w * (j + 1) - counts))
            pattern[j] = k
            counts[k] += 1
        self.pattern = pattern
        self.per_period = np.bincount(pattern, minlength=len(orders))
        # rank[j] = how many earlier slots in the period belong to pattern[j]'s source
        self.slot_rank = np.zeros(self.period, dtype=np.int64)
        seen = np.zeros(len(orders), dtype=np.int64)
        for j, k in enumerate(pattern):
            self.slot_rank[j] = seen[k]
            seen[k] += 1
        if (self.per_period == 0).any():
            raise ValueError(
                "a source weight is too small to get any sample in a period of "
                f"{self.period}: raise it or drop the source"
            )

    def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(source, shard, row) for global stream positions."""
        positions = np.asarray(positions, dtype=np.int64)
        q, r = np.divmod(positions, self.period)
        source = self.pattern[r]
        local = q * self.per_period[source] + self.slot_rank[r]
        shard = np.empty_like(positions)
        row = np.empty_like(positions)
        for k in np.unique(source):
            sel = source == k
            shard[sel], row[sel] = self.orders[int(k)].locate(local[sel])
        return source, shard, row
