"""train.skip_spike_sigma: the rule (OLMo-core's SkipStepOptimizer), its state, and the gate on a
real DeepSpeed engine (weights and Adam's moments untouched by a skipped update)."""

from __future__ import annotations

import logging

import pytest
import torch

from ds_train.train.spike_guard import SpikeGuard


def _feed(guard: SpikeGuard, values: list[tuple[float, float | None]], start: int = 1) -> list[bool]:
    out = []
    for i, (loss, norm) in enumerate(values, start):
        guard.arm(i, torch.tensor(loss))
        out.append(guard.allow(norm))
    return out


def _steady(n: int) -> list[tuple[float, float]]:
    return [(3.0 + 0.01 * (i % 5), 1.0 + 0.02 * (i % 3)) for i in range(n)]


def test_a_loss_or_grad_norm_spike_is_skipped_once_half_the_window_is_seen(caplog):
    guard = SpikeGuard(sigma=6, window=8)
    # before 4 steps of history nothing is judged, however large
    assert _feed(guard, [(3.0, 1.0), (3.01, 1.02), (50.0, 1.0)]) == [True] * 3
    guard = SpikeGuard(sigma=6, window=8)
    assert all(_feed(guard, _steady(8)))
    with caplog.at_level(logging.WARNING):
        assert _feed(guard, [(9.0, 1.0)], start=9) == [False]  # loss
    assert "step 9: update skipped (train.skip_spike_sigma=6): loss 9 is" in caplog.text
    assert _feed(guard, [(3.01, 40.0)], start=10) == [False]  # gradient norm alone
    assert _feed(guard, [(3.02, 1.01)], start=11) == [True]
    assert guard.skipped_steps == 2
    assert _feed(guard, [(3.02, None)], start=12) == [True]  # no norm from DeepSpeed: the loss alone


def test_the_first_call_decides_for_the_step_and_unarmed_updates_run():
    guard = SpikeGuard(sigma=3, window=4)
    _feed(guard, _steady(4))
    guard.arm(5, torch.tensor(100.0))
    assert [guard.allow(1.0) for _ in range(3)] == [False, False, False]  # ZeRO-3's sub-groups
    assert guard.skipped_steps == 1
    assert guard.allow(1.0) is False  # still the same step's decision
    fresh = SpikeGuard(sigma=3, window=4)
    assert fresh.allow(100.0)  # nothing armed: not a training step's update


def test_history_is_bounded_holds_only_finite_values_and_round_trips():
    guard = SpikeGuard(sigma=6, window=4)
    _feed(guard, [*_steady(6), (float("nan"), float("inf"))])
    assert len(guard.losses) == 4 and all(map(lambda x: x == x, guard.losses))  # no NaN
    assert guard.grad_norms[-1] != float("inf")
    again = SpikeGuard(sigma=6, window=4, state=guard.state())
    spike = [(3.0, 1.0), (30.0, 1.0), (3.0, 1.0)]
    assert _feed(again, spike) == _feed(guard, spike)
    assert again.state() == guard.state()


def test_a_level_shift_stops_counting_as_a_spike():
    """Every value joins the history, skipped or not: a lasting new level is learned."""
    guard = SpikeGuard(sigma=3, window=8)
    _feed(guard, _steady(8))
    decisions = _feed(guard, [(4.0 + 0.01 * (i % 3), 1.0) for i in range(12)], start=9)
    assert not decisions[0] and decisions[-1]


def test_the_config_validates_the_settings(tmp_path, shards):
    from ds_train.config import ConfigError, load_config, validate
    from tests.helpers import base_config, write_config

    cfg_file = write_config(tmp_path / "c.yaml", base_config(tmp_path / "run", shards))
    for override, message in (
        ("train.skip_spike_sigma=-1", "train.skip_spike_sigma must be ≥ 0"),
        ("train.skip_spike_window=3", "train.skip_spike_window must be ≥ 4"),
        (
            'zero.ds_config_overrides={"zero_optimization": {"offload_optimizer": {"ratio": 0.5}}}',
            "cannot gate DeepSpeed's partial optimizer offload",
        ),
    ):
        with pytest.raises(ConfigError, match=message):
            validate(load_config(cfg_file, ["train.skip_spike_sigma=6", override]))
    validate(
        load_config(
            cfg_file,
            ['zero.ds_config_overrides={"zero_optimization": {"offload_optimizer": {"ratio": 0.5}}}'],
        )
    )
