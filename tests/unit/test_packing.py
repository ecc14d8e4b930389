"""Packing: the streaming Packer and the sharder's range cutter give the same rows and boundaries."""

from __future__ import annotations

import numpy as np
import pytest

from ds_train.data.packing import Packer, cut_rows, effective_pad, packed_row_count, row_doc_starts

EOS, PAD = 0, 1


def _docs(seed: int, n: int, max_len: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(2, 500, rng.integers(0, max_len)) for _ in range(n)]


def _packer_rows(docs, seq_len, pad):
    rows, starts = [], []
    packer = Packer(seq_len, EOS, pad, lambda r, s, _f: (rows.append(r.copy()), starts.append(s)))
    for d in docs:
        packer.add(d)
    packer.finish()
    return rows, starts


@pytest.mark.parametrize("seq_len", [2, 7, 32])
@pytest.mark.parametrize("pad", [PAD, None, EOS])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cut_rows_equals_streaming_packer(seq_len, pad, seed):
    docs = _docs(seed, 40, 3 * seq_len)
    ref_rows, ref_starts = _packer_rows(docs, seq_len, pad)
    stream = np.concatenate([np.append(d, EOS) for d in docs])
    doc_offsets = np.cumsum([0] + [len(d) + 1 for d in docs])[:-1]
    p = effective_pad(EOS, pad)
    n = packed_row_count(len(stream), seq_len, p)
    assert n == len(ref_rows)
    # cut in uneven ranges, as shards of different sizes would
    got_rows, got_starts, first = [], [], 0
    for size in [1, 3, 5, 100]:
        k = min(size, n - first)
        if k <= 0:
            break
        lo = first * seq_len
        got_rows.append(cut_rows(stream[lo : lo + (k - 1) * seq_len + seq_len + 1], k, seq_len, p))
        got_starts += row_doc_starts(doc_offsets, lo, k, seq_len)
        first += k
    assert first == n
    if n:
        np.testing.assert_array_equal(np.concatenate(got_rows), np.stack(ref_rows))
    # the packer also lists a start at column seq_len (the next row's column 0); the cutter does not
    assert got_starts == [[c for c in s if c < seq_len] for s in ref_starts]


def test_every_token_is_a_target_once_and_rows_overlap_by_one():
    stream = np.arange(2, 2 + 50)
    rows = cut_rows(stream, packed_row_count(50, 8, None), 8, None)
    assert rows.shape == (6, 9)
    np.testing.assert_array_equal(rows[1:, 0], rows[:-1, -1])
    targets = rows[:, 1:].ravel()
    np.testing.assert_array_equal(targets, stream[1 : 1 + len(targets)])


def test_last_partial_row_padded_only_with_a_distinct_pad_token():
    assert packed_row_count(34, 32, PAD) == 2  # 33 tokens + 1 left over: padded row of 2 real tokens
    assert packed_row_count(34, 32, None) == 1
    assert packed_row_count(33, 32, PAD) == 1  # one token left would be an input with no target
    assert packed_row_count(1, 32, PAD) == 0
    assert effective_pad(EOS, EOS) is None
    row = cut_rows(np.array([5, 6, 7]), 1, 4, PAD)
    np.testing.assert_array_equal(row, [[5, 6, 7, PAD, PAD]])
