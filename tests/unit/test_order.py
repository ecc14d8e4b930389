"""The global sample order: a pure function of (seed, epoch, rows per shard)."""

from __future__ import annotations

import numpy as np
import pytest

from ds_train.data.order import MixtureOrder, SampleOrder

ROWS = np.array([7, 3, 11, 5, 9, 1, 4])  # uneven shards


def _ids(order: SampleOrder, lo: int, hi: int) -> np.ndarray:
    shard, row = order.locate(np.arange(lo, hi))
    starts = np.concatenate([[0], np.cumsum(order.rows)[:-1]])
    return starts[shard] + row


@pytest.mark.parametrize("window", [1, 2, 16])
def test_each_epoch_is_a_permutation_of_all_rows(window):
    order = SampleOrder(ROWS, seed=5, window=window)
    total = int(ROWS.sum())
    seen = [np.sort(_ids(order, e * total, (e + 1) * total)) for e in range(3)]
    for s in seen:
        np.testing.assert_array_equal(s, np.arange(total))
    # epochs differ, and the shard visiting order too
    assert not np.array_equal(_ids(order, 0, total), _ids(order, total, 2 * total))


def test_order_is_pure_and_seeded_by_integers_only():
    a = SampleOrder(ROWS, seed=5, window=2)
    b = SampleOrder(ROWS, seed=5, window=2)
    positions = np.array([400, 3, 77, 39, 0, 1000])  # any order, across epochs
    np.testing.assert_array_equal(np.stack(a.locate(positions)), np.stack(b.locate(positions[::-1]))[:, ::-1])
    c = SampleOrder(ROWS, seed=6, window=2)
    assert not np.array_equal(_ids(a, 0, 40), _ids(c, 0, 40))


def test_window_bounds_how_far_rows_travel():
    order = SampleOrder(ROWS, seed=1, window=2)
    shard, _ = order.locate(np.arange(ROWS.sum()))
    perm = order._epoch(0)[0]
    # within each window of 2 permuted shards, rows of only those shards appear
    pos = 0
    for w in range(0, len(perm), 2):
        members = set(perm[w : w + 2].tolist())
        n = int(ROWS[perm[w : w + 2]].sum())
        assert set(shard[pos : pos + n].tolist()) == members
        pos += n


def test_no_shuffle_reads_shards_in_order():
    order = SampleOrder(ROWS, seed=1, shuffle=False)
    shard, row = order.locate(np.arange(ROWS.sum()))
    assert shard.tolist() == sorted(shard.tolist())
    assert row[:7].tolist() == list(range(7))


def test_mixture_follows_weights_in_every_window_and_each_source_epoch_is_complete():
    a, b = SampleOrder(np.array([30, 30]), 0, stream=0), SampleOrder(np.array([10]), 0, stream=1)
    mix = MixtureOrder([a, b], [3.0, 1.0], period=8)
    source, _, row = mix.locate(np.arange(80))
    for lo in range(0, 80, 8):
        assert np.bincount(source[lo : lo + 8], minlength=2).tolist() == [6, 2]
    # the 20 samples of source 1 are two complete epochs of its 10 rows
    ids = row[source == 1]
    assert sorted(ids[:10].tolist()) == list(range(10)) == sorted(ids[10:].tolist())


def test_a_weight_too_small_for_the_period_is_refused():
    a, b = SampleOrder(np.array([5]), 0), SampleOrder(np.array([5]), 0, stream=1)
    with pytest.raises(ValueError, match="too small"):
        MixtureOrder([a, b], [1.0, 1e-9], period=100)
