"""A mixture's per-source training loss over a log interval (train/source_losses.py), and the
trainer carrying it into its log lines."""

from __future__ import annotations

import pytest
import torch

from ds_train.train.source_losses import SourceLosses


def _reduced(losses: SourceLosses) -> list[float]:
    return losses.pending().tolist()  # one rank: the all-reduce changes nothing


def test_each_source_is_its_tokens_mean_over_the_interval_and_absent_sources_are_left_out():
    losses = SourceLosses(["web", "code", "books"], torch.device("cpu"))
    losses.add({"source_loss": torch.tensor([[10.0, 4.0], [3.0, 1.0], [0.0, 0.0]])})
    losses.add({})  # a batch without the sums (an objective that gives none)
    losses.add({"source_loss": torch.tensor([[2.0, 2.0], [0.0, 0.0], [0.0, 0.0]])})
    assert losses.record(_reduced(losses)) == pytest.approx(
        {"loss/web": 12.0 / 6.0, "loss/code": 3.0, "mix/web": 6 / 7, "mix/code": 1 / 7, "mix/books": 0.0}
    )
    assert losses.record(_reduced(losses)) == {}  # the next interval starts from nothing


def test_the_trainer_logs_them_on_every_log_line():
    from tests.unit.stand_in_trainer import ConstantLoss, LogRecords, stand_in_trainer

    class Mixture(ConstantLoss):
        def loss_sum(self, engine, batch):
            batch["source_loss"] = torch.tensor([[16.0, 8.0], [0.0, 0.0]])  # 8 targets of source 0
            return super().loss_sum(engine, batch)

    logs = LogRecords()
    trainer = stand_in_trainer([logs], max_steps=3, log_every=2)
    trainer.objective, trainer.source_losses = Mixture(), SourceLosses(["a", "b"], torch.device("cpu"))
    assert trainer.fit() == 0
    assert [r["step"] for r in logs.records] == [2, 3]  # the last, short interval too
    for r in logs.records:
        assert r["loss/a"] == 2.0 and "loss/b" not in r and (r["mix/a"], r["mix/b"]) == (1.0, 0.0)
