"""A mixture's per-source training loss over a log interval (train/source_losses.py)."""

from __future__ import annotations

import pytest
import torch

from ds_train.train.source_losses import SourceLosses


def test_each_source_is_its_tokens_mean_over_the_interval_and_absent_sources_are_left_out():
    losses = SourceLosses(["web", "code", "books"], torch.device("cpu"))
    losses.add({"source_loss": torch.tensor([[10.0, 4.0], [3.0, 1.0], [0.0, 0.0]])})
    losses.add({})  # a batch without the sums (an objective that gives none)
    losses.add({"source_loss": torch.tensor([[2.0, 2.0], [0.0, 0.0], [0.0, 0.0]])})
    assert losses.take() == pytest.approx(
        {"loss/web": 12.0 / 6.0, "loss/code": 3.0, "mix/web": 6 / 7, "mix/code": 1 / 7, "mix/books": 0.0}
    )
    assert losses.take() == {}  # the next interval starts from nothing
