"""One validation loss per data.valid set (`valid_loss/<name>`) beside the overall one: the names,
the per-set sums of one evaluation pass, and the whole path from a config to metrics.jsonl."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ds_train.data.loader import MicroBatches, build_plan, eval_steps_once
from ds_train.data.shard_set import DataError, source_names
from ds_train.distributed.deepspeed_config import BatchLayout
from ds_train.objectives.base import IGNORE_INDEX
from ds_train.objectives.causal_lm import CausalLM
from ds_train.train.evaluation import evaluation_record
from tests.helpers import base_config, read_metrics, run_cli, write_config


def test_set_names_are_the_shortest_distinguishing_path_ends():
    assert source_names("/d/shards/valid") == ["valid"]
    assert source_names(
        ["/d/web/valid", "/d/code/valid/index.json", "https://h/x/valid/valid-{000000..000003}.tar"]
    ) == ["web/valid", "code/valid", "x/valid"]
    assert source_names([{"path": "a/valid", "name": "prose"}, "b/valid"]) == ["prose", "b/valid"]
    assert source_names(["a/valid", "a/valid"]) == ["a/valid", "a/valid#2"]  # listed twice
    with pytest.raises(DataError, match="distinct `name`"):
        source_names([{"path": "a", "name": "x"}, {"path": "b", "name": "x"}])


class SourceLoss(CausalLM):
    """Every target of set k costs k + 1: the per-set losses are known exactly."""

    def row_losses(self, model, batch):
        targets = (batch["labels"] != IGNORE_INDEX).sum(1).float()
        return targets * (batch["source"].float() + 1)

    def loss_sum(self, model, batch):
        return self.row_losses(model, batch).sum()


def _pass(shards, objective, names):
    spec = [str(shards / "valid"), str(shards / "train" / "train-{000000..000000}.tar")]
    plan = build_plan(spec, seed=0, shuffle=False, window=1, evaluation=True)
    layout = BatchLayout(8, 4, 2, 1)
    ds = MicroBatches(plan, layout, 0, 0, objective, None, limit=plan.epoch_size)
    steps = eval_steps_once(plan, layout, eval_steps=1000)
    batches = [ds[k] for k in range(steps * layout.grad_accum)]
    record = evaluation_record(None, objective, batches, lambda b: b, torch.device("cpu"), names)
    return batches, record


def test_each_set_gets_the_loss_of_its_own_rows(shards):
    batches, record = _pass(shards, SourceLoss(eos_id=None), ["valid", "train"])
    assert record["valid_loss/valid"] == 1.0 and record["valid_loss/train"] == 2.0
    # the overall loss weighs every target token the same, across sets
    targets = [int((b["labels"][b["source"] == k] != IGNORE_INDEX).sum()) for b in batches for k in (0, 1)]
    per_set = np.array(targets).reshape(-1, 2).sum(0)
    assert per_set.min() > 0 and record["valid_tokens"] == per_set.sum()
    assert record["valid_loss"] == pytest.approx((per_set[0] * 1 + per_set[1] * 2) / per_set.sum())
    assert record["valid_ppl"] == pytest.approx(np.exp(record["valid_loss"]))


class SummedOnly:
    """An objective without `row_losses` (e.g. a user's own): one overall loss, as before."""

    name = "summed"

    def __init__(self):
        self.inner = SourceLoss(eos_id=None)

    def collate(self, rows, sample_ids):
        return self.inner.collate(rows, sample_ids)

    def loss_sum(self, model, batch):
        return self.inner.loss_sum(model, batch)


def test_one_set_or_no_row_losses_keeps_the_single_loss(shards):
    _, both = _pass(shards, SourceLoss(eos_id=None), ["valid", "train"])
    for objective, names in ((SourceLoss(eos_id=None), ["valid"]), (SummedOnly(), ["valid", "train"])):
        _, record = _pass(shards, objective, names)
        assert not [k for k in record if k.startswith("valid_loss/")]
        assert record["valid_loss"] == both["valid_loss"] and record["valid_tokens"] == both["valid_tokens"]


@pytest.mark.slow
def test_pretraining_reports_each_validation_set(shards, tmp_path):
    """Config to metrics.jsonl and the console: two sets, named by the user and by their path."""
    valid = [
        {"path": str(shards / "valid"), "name": "held-out"},
        str(shards / "train" / "train-{000000..000000}.tar"),
    ]
    cfg = base_config(
        tmp_path / "run",
        shards,
        data={"valid": valid},
        train={"max_steps": 2, "eval_every": 2, "eval_steps": 100},
    )
    proc = run_cli(["pretrain", write_config(tmp_path / "c.yaml", cfg)])
    (evaluation,) = [r for r in read_metrics(tmp_path / "run") if "valid_loss" in r]
    held_out, train = evaluation["valid_loss/held-out"], evaluation["valid_loss/train"]
    assert held_out != train and min(held_out, train) < evaluation["valid_loss"] < max(held_out, train)
    assert f"(held-out {held_out:.4f}, train {train:.4f})" in proc.stderr


def test_a_per_example_loss_has_no_perplexity(shards):
    """Classification's loss is one cross-entropy per example: a perplexity of it means nothing."""
    objective = SourceLoss(eos_id=None)
    objective.per_token = False
    _, record = _pass(shards, objective, ["valid", "train"])
    assert "valid_ppl" not in record and record["valid_loss/train"] == 2.0
