"""LR schedule shape, per-document position ids, label masking and MLM determinism."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ds_train.objectives.base import IGNORE_INDEX, document_position_ids
from ds_train.objectives.causal_lm import CausalLM
from ds_train.objectives.masked_lm import MaskedLM
from ds_train.train.schedule import lr_multiplier


def test_warmup_then_cosine_to_min():
    f = lr_multiplier("cosine", warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
    lin = lr_multiplier("linear", 0, 100, 0.0)
    assert lin(50) == pytest.approx(0.5)
    assert lr_multiplier("constant", 5, 100, 0.0)(80) == 1.0


def test_warmup_stable_decay_holds_the_peak_then_cools_down():
    """wsd (pretraining audit: only cosine/linear/constant were offered): warmup, the peak held,
    then a cooldown over the last decay_steps (default 20% of the run), linear or 1-sqrt."""
    from types import SimpleNamespace

    from ds_train.train.schedule import schedule_change_note, schedule_settings

    wsd = lr_multiplier("wsd", 10, 100, 0.1, 20)
    assert wsd(5) == pytest.approx(0.6) and wsd(10) == wsd(79) == wsd(80) == 1.0
    assert wsd(90) == pytest.approx(0.1 + 0.9 * 0.5) and wsd(99) == pytest.approx(0.1 + 0.9 * 0.05)
    assert wsd(100) == pytest.approx(0.1)
    assert lr_multiplier("wsd_sqrt", 10, 100, 0.0, 20)(90) == pytest.approx(1 - math.sqrt(0.5))
    assert lr_multiplier("wsd", 0, 100, 0.0)(79) == 1.0 and lr_multiplier("wsd", 0, 100, 0.0)(
        90
    ) == pytest.approx(0.5)
    # extended before its cooldown: the same rate at the resumed step, and no warning of a jump
    before = SimpleNamespace(
        lr=1e-3, schedule="wsd", warmup_steps=10, max_steps=100, min_lr_ratio=0.1, decay_steps=20
    )
    longer = SimpleNamespace(**{**vars(before), "max_steps": 200})
    assert schedule_change_note(schedule_settings(before), longer, 50) is None
    assert "step 91 trains at lr 0.001" in schedule_change_note(schedule_settings(before), longer, 90)


def test_document_positions_restart_after_eos():
    eos = 0
    tokens = torch.tensor([[5, 6, 0, 7, 8, 9, 0, 4], [0, 3, 3, 3, 0, 0, 2, 2]])
    pos = document_position_ids(tokens, eos)
    assert pos.tolist() == [[0, 1, 2, 0, 1, 2, 3, 0], [0, 0, 1, 2, 3, 0, 0, 1]]


def test_causal_lm_shifts_and_never_targets_padding():
    obj = CausalLM(eos_id=0, pad_id=1)
    rows = np.array([[5, 6, 0, 7, 8], [9, 9, 0, 1, 1]], dtype=np.uint16)
    b = obj.collate(rows, np.array([10, 11]))
    assert b["input_ids"].tolist() == [[5, 6, 0, 7], [9, 9, 0, 1]]
    assert b["labels"].tolist() == [[6, 0, 7, 8], [9, 0, IGNORE_INDEX, IGNORE_INDEX]]
    assert b["num_targets"].item() == 6
    assert b["position_ids"].tolist() == [[0, 1, 2, 0], [0, 1, 2, 0]]


def test_masked_lm_is_deterministic_per_sample_and_skips_specials():
    obj = MaskedLM(mask_id=3, vocab_size=100, special_ids=(0, 1, 2, 3), seed=5, probability=0.3)
    rng = np.random.default_rng(0)
    rows = rng.integers(4, 100, size=(4, 65)).astype(np.int64)
    rows[:, 0] = 1  # a special token is never a target
    a = obj.collate(rows, np.array([100, 101, 102, 103]))
    b = obj.collate(rows[[2, 3]], np.array([102, 103]))  # same samples in another batch/worker
    assert torch.equal(a["labels"][2:], b["labels"]) and torch.equal(a["input_ids"][2:], b["input_ids"])
    assert (a["labels"][:, 0] == IGNORE_INDEX).all()
    chosen = a["labels"] != IGNORE_INDEX
    assert 0.2 < chosen.float().mean() < 0.4
    masked = a["input_ids"][chosen] == 3
    assert 0.7 < masked.float().mean() < 0.9  # ~80% of targets become [MASK]
    assert a["num_targets"].item() == chosen.sum().item()
