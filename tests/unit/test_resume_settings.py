"""A resume takes the optimizer settings from the config, not from the checkpoint: DeepSpeed
restores the checkpoint's LambdaLR base_lrs and the optimizer's groups, so a run resumed with a
lower train.lr (after a loss spike, say) went on at the old one. Checked here on a plain AdamW and
LambdaLR, the objects DeepSpeed saves and restores, with `engine.lr_scheduler` as DeepSpeed has it."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch.optim.lr_scheduler import LambdaLR

from ds_train.train.schedule import lr_multiplier
from ds_train.train.session import optimizer_settings, restore_optimizer_settings


def _engine(lr: float, weight_decay: float, betas: tuple, max_steps: int = 10):
    torch.manual_seed(0)
    w, b = torch.nn.Parameter(torch.randn(4, 4)), torch.nn.Parameter(torch.zeros(4))
    groups = [{"params": [w], "weight_decay": weight_decay}, {"params": [b], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=betas, eps=1e-8)
    lam = lr_multiplier("cosine", 2, max_steps, 0.1)
    scheduler = LambdaLR(optimizer, lam)
    return SimpleNamespace(lr_scheduler=scheduler, optimizer=optimizer, params=(w, b)), lam


def _train(engine, steps: int) -> None:
    for _ in range(steps):
        loss = (engine.params[0].sum() + engine.params[1].sum()) ** 2
        loss.backward()
        engine.optimizer.step()
        engine.optimizer.zero_grad()
        engine.lr_scheduler.step()


def _resume(saved, lr, weight_decay, betas, max_steps=10):
    """A new engine from the config, the checkpoint loaded into it as DeepSpeed does, then restored."""
    engine, lam = _engine(lr, weight_decay, betas, max_steps)
    configured = optimizer_settings(engine)
    engine.optimizer.load_state_dict(saved[0])
    engine.lr_scheduler.load_state_dict(saved[1])
    changed, restored = restore_optimizer_settings(engine, configured, lam)
    assert restored == ""  # nothing else changed by the loading here
    return engine, changed, lam


@pytest.fixture
def checkpoint():
    engine, _ = _engine(1e-3, 0.1, (0.9, 0.95))
    _train(engine, 4)
    return engine.optimizer.state_dict(), engine.lr_scheduler.state_dict()


def test_unchanged_settings_resume_exactly(checkpoint):
    reference, _ = _engine(1e-3, 0.1, (0.9, 0.95))
    _train(reference, 4)
    engine, changed, _ = _resume(checkpoint, 1e-3, 0.1, (0.9, 0.95))
    assert changed == ""
    assert [g["lr"] for g in engine.optimizer.param_groups] == [
        g["lr"] for g in reference.optimizer.param_groups
    ]


def test_the_configs_lr_weight_decay_and_betas_win(checkpoint):
    engine, changed, lam = _resume(checkpoint, 1e-2, 0.5, (0.8, 0.99))
    assert changed == "lr 0.001 → 0.01; betas (0.9, 0.95) → (0.8, 0.99); weight_decay 0.1 → 0.5"
    groups = engine.optimizer.param_groups
    assert [g["lr"] for g in groups] == [1e-2 * lam(4)] * 2  # the new peak on the schedule at step 4
    assert [g["weight_decay"] for g in groups] == [0.5, 0.0]  # norms and biases stay undecayed
    assert all(tuple(g["betas"]) == (0.8, 0.99) for g in groups)
    _train(engine, 1)  # and the scheduler goes on from the new peak
    assert groups[0]["lr"] == pytest.approx(1e-2 * lam(5))


def test_a_longer_schedule_applies_from_the_first_resumed_step(checkpoint):
    engine, changed, lam = _resume(checkpoint, 1e-3, 0.1, (0.9, 0.95), max_steps=20)
    assert changed == ""  # the schedule's length is not a setting of the checkpoint's
    assert engine.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * lam(4))
    assert lam(4) != lr_multiplier("cosine", 2, 10, 0.1)(4)  # it was the old schedule's value


def test_a_group_the_loading_changed_is_put_back_without_blaming_the_config(checkpoint):
    """DeepSpeed's universal-format loading (an elastic resume) gives the no-decay group the decay
    group's weight decay: put back, and not reported as a change of the config's."""
    engine, lam = _engine(1e-3, 0.1, (0.9, 0.95))
    configured = optimizer_settings(engine)
    engine.optimizer.load_state_dict(checkpoint[0])
    engine.lr_scheduler.load_state_dict(checkpoint[1])
    engine.optimizer.param_groups[1]["weight_decay"] = 0.1  # as that loading leaves it
    changed, restored = restore_optimizer_settings(engine, configured, lam)
    assert changed == "" and restored == "parameter group 1's weight_decay 0.1 → 0.0"
    assert engine.optimizer.param_groups[1]["weight_decay"] == 0.0
