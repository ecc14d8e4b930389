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

import bisect
from collections import OrderedDict

import numpy as np

MIX_PERIOD = 10_000
MAX_MAP_ROWS = 1 << 23  # 8M rows: a window map is 8 bytes a row (int32 shard + int32 row), ≤ 64 MB


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
        self._epochs: OrderedDict[int, tuple[np.ndarray, np.ndarray, np.ndarray, list[int]]] = OrderedDict()
        self._maps: OrderedDict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._perms: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()

    def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard index, row within shard) for stream positions (≥ 0, may exceed one epoch)."""
        positions = np.asarray(positions, dtype=np.int64)
        fast = self._locate_run(positions)
        if fast is not None:
            return fast
        shard = np.empty_like(positions)
        row = np.empty_like(positions)
        epochs, within = np.divmod(positions, self.total)
        for e, sel in _groups(epochs):
            window_starts = self._epoch(e)[2]
            pos = within[sel]
            k = np.searchsorted(window_starts, pos, side="right") - 1
            s_out = np.empty_like(pos)
            r_out = np.empty_like(pos)
            for w, wsel in _groups(k):
                s_out[wsel], r_out[wsel] = self._in_window(e, w, pos[wsel] - window_starts[w])
            shard[sel] = s_out
            row[sel] = r_out
        return shard, row

    def _locate_run(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """The common case in a few slices: consecutive positions (a rank's micro-batch) inside one
        shuffle window of one epoch. None when that does not apply."""
        n = len(positions)
        if not n or int(positions[-1]) - int(positions[0]) != n - 1:
            return None
        first = int(positions[0])
        # Same ends, same length: consecutive unless out of order (a list compare is ~10× cheaper
        # than np.array_equal for a micro-batch, and this runs once per micro-batch).
        if n > 2 and positions.tolist() != list(range(first, first + n)):
            return None
        e, a = divmod(first, self.total)
        if a + n > self.total:
            return None
        bounds = self._epoch(e)[3]
        w = bisect.bisect_right(bounds, a) - 1
        if a + n > bounds[w + 1]:
            return None
        maps = self._window_map(e, w)
        if maps is None:
            return None
        lo = a - bounds[w]
        return maps[0][lo : lo + n].astype(np.int64), maps[1][lo : lo + n].astype(np.int64)

    def _in_window(self, e: int, w: int, local: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard, row) of offsets `local` within window w of epoch e."""
        maps = self._window_map(e, w)
        if maps is not None:
            return maps[0][local].astype(np.int64), maps[1][local].astype(np.int64)
        perm, starts, _, _ = self._epoch(e)
        lo_shard = w * self.window
        hi_shard = min(lo_shard + self.window, len(perm))
        if self.shuffle:
            local = self._window_perm(e, w, int(starts[hi_shard] - starts[lo_shard]))[local]
        flat = local + starts[lo_shard]
        j = np.searchsorted(starts, flat, side="right") - 1  # position in the permuted shard list
        return perm[j], flat - starts[j]

    def epoch_of(self, position: int) -> int:
        return position // self.total

    def _epoch(self, e: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[int]]:
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
        bounds = [*window_starts.tolist(), self.total]  # for bisect on plain ints
        self._epochs[e] = (perm, starts, window_starts, bounds)
        while len(self._epochs) > 2:
            self._epochs.popitem(last=False)
        return self._epochs[e]

    def _window_map(self, e: int, w: int) -> tuple[np.ndarray, np.ndarray] | None:
        """(shard, row) of every offset of window w, computed once per window and kept for the
        few windows in use: each position is then two array lookups. None for windows too large
        to tabulate (they are located arithmetically)."""
        key = (e, w)
        if key in self._maps:
            self._maps.move_to_end(key)
            return self._maps[key]
        perm, starts, _, bounds = self._epoch(e)
        size = bounds[w + 1] - bounds[w]
        if size > MAX_MAP_ROWS:
            return None
        lo_shard = w * self.window
        hi_shard = min(lo_shard + self.window, len(perm))
        counts = self.rows[perm[lo_shard:hi_shard]]
        shard_of = np.repeat(perm[lo_shard:hi_shard].astype(np.int32), counts)
        row_of = (np.arange(size) - np.repeat(starts[lo_shard:hi_shard] - starts[lo_shard], counts)).astype(
            np.int32
        )
        if self.shuffle:
            order = self._window_perm(e, w, size)
            shard_of, row_of = shard_of[order], row_of[order]
        self._maps[key] = (shard_of, row_of)
        while len(self._maps) > 4:
            self._maps.popitem(last=False)
        return self._maps[key]

    def _window_perm(self, e: int, w: int, size: int) -> np.ndarray:
        """Row order within window w of epoch e (kept for the last two windows: the untabulated
        path asks for it on every call)."""
        key = (e, w)
        if key not in self._perms:
            self._perms[key] = np.random.default_rng([self.seed, self.stream, e, w, 1]).permutation(size)
            while len(self._perms) > 2:
                self._perms.popitem(last=False)
        return self._perms[key]


def _groups(keys: np.ndarray):
    """(key, selector) per distinct key; one group and no sorting in the common case (a
    micro-batch rarely straddles an epoch or a shuffle window)."""
    if not len(keys):
        return
    lo, hi = int(keys.min()), int(keys.max())
    if lo == hi:
        yield lo, slice(None)
        return
    for k in np.unique(keys):
        yield int(k), keys == k


class StarvedSource(ValueError):
    """A source whose weight gets it no sample in a period of the mixture (the caller names it)."""

    def __init__(self, index: int, period: int):
        super().__init__(
            f"source {index}'s weight is too small to get any sample in a period of {period}: "
            "raise it or drop the source"
        )
        self.index = index
        self.period = period


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
            raise StarvedSource(int(np.flatnonzero(self.per_period == 0)[0]), self.period)

    def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(source, shard, row) for global stream positions."""
        positions = np.asarray(positions, dtype=np.int64)
        if len(self.orders) == 1:
            shard, row = self.orders[0].locate(positions)
            return np.zeros(len(positions), dtype=np.int64), shard, row
        q, r = np.divmod(positions, self.period)
        source = self.pattern[r]
        local = q * self.per_period[source] + self.slot_rank[r]
        shard = np.empty_like(positions)
        row = np.empty_like(positions)
        for k in np.unique(source):
            sel = source == k
            shard[sel], row[sel] = self.orders[int(k)].locate(local[sel])
        return source, shard, row
