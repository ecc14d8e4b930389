"""Batches cross from DataLoader workers packed into one buffer and come back field for field."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from ds_train.data import batch_transfer
from ds_train.data.batch_transfer import pack_batch, unpack_batch


@pytest.mark.parametrize("big", [False, True])
def test_pack_unpack_round_trip(big, monkeypatch):
    if big:  # force the shared-memory tensor path
        monkeypatch.setattr(batch_transfer, "SHM_BYTES", 0)
    batch = {
        "input_ids": torch.arange(30, dtype=torch.int64).view(3, 10),
        "labels": torch.arange(30, dtype=torch.int64).view(3, 10)[:, ::2],  # not contiguous
        "mask": torch.tensor([True, False, True]),
        "num_targets": torch.tensor(7.5),
        "step": torch.tensor(4),
        "half": torch.ones(5, dtype=torch.bfloat16),
        "empty": torch.empty(0, dtype=torch.int32),
        "note": "kept as is",
        "ids": np.arange(3),
    }
    layout, flat = pack_batch(batch)
    assert isinstance(flat, torch.Tensor) == big
    out = unpack_batch(pickle.loads(pickle.dumps((layout, flat))))  # what a worker queue does
    assert list(out) == list(batch)
    for k, v in batch.items():
        if torch.is_tensor(v):
            assert out[k].dtype == v.dtype and out[k].shape == v.shape
            assert torch.equal(out[k], v), k
        else:
            assert out[k] is v or np.array_equal(out[k], v)
    assert int(out["step"]) == 4
