"""The optimizer's parameter groups, and the settings a resume takes from the config rather than
from the checkpoint."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

OPTIMIZER_KEYS = ("initial_lr", "betas", "eps", "weight_decay")  # what a resume takes from the config


def optimizer_settings(engine: Any) -> list[dict]:
    """Each parameter group's configured hyperparameters, as the engine was built from the config."""
    groups = engine.lr_scheduler.optimizer.param_groups
    return [{k: g[k] for k in OPTIMIZER_KEYS if k in g} for g in groups]


def restore_optimizer_settings(
    engine: Any, configured: list[dict], lr_lambda: Callable[[int], float]
) -> tuple[str, str]:
    """After loading a checkpoint: the config's peak lr, betas, eps and weight decay again, and the
    current lr from the config's schedule at the resumed step. DeepSpeed restores the checkpoint's
    (LambdaLR's base_lrs and the optimizer's groups), so a run resumed with a lower train.lr, e.g.
    after a loss spike, went on at the old one, silently. Unchanged settings give the very lr the
    scheduler had (the same product), so an exact resume stays exact.

    Returns (what the config changed, read from the first group, which carries every setting;
    what else was put back: DeepSpeed's universal-format loading gives the no-decay group of
    biases and norms the first group's weight decay)."""
    scheduler = engine.lr_scheduler
    groups = scheduler.optimizer.param_groups
    # Groups saved by another optimizer class (torch's AdamW before optimizer offload was turned
    # on: DeepSpeed's CPU Adam reads `bias_correction`) lack its settings: they take its defaults.
    for key, value in (getattr(getattr(engine, "basic_optimizer", None), "defaults", None) or {}).items():
        for group in groups:
            group.setdefault(key, value)
    changed, restored = [], []
    changed_keys = set()  # settings the config changed (group 0's): not reported again per group
    for i, (group, wanted) in enumerate(zip(groups, configured, strict=True)):
        for key, value in wanted.items():
            old = group.get(key)
            if _as_list(old) != _as_list(value):  # betas come back as a list or a tuple
                name = "lr" if key == "initial_lr" else key
                if i == 0:
                    changed_keys.add(key)
                    changed.append(f"{name} {old} → {value}")
                elif key not in changed_keys:
                    restored.append(f"parameter group {i}'s {name} {old} → {value}")
            group[key] = value
    scheduler.base_lrs = [g["initial_lr"] for g in groups]
    for group, base in zip(groups, scheduler.base_lrs, strict=True):
        group["lr"] = base * lr_lambda(scheduler.last_epoch)
    return "; ".join(changed), "; ".join(restored)


def _as_list(value: Any) -> Any:
    return list(value) if isinstance(value, (tuple, list)) else value


def param_groups(model: torch.nn.Module, weight_decay: float, decay_embeddings: bool = True) -> list[dict]:
    """Weight decay on matrices only; biases and norm weights are not decayed, nor, with
    `decay_embeddings` off (train.embedding_weight_decay), the nn.Embedding tables."""
    embeddings = set()
    if not decay_embeddings:
        embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        shape = getattr(p, "ds_shape", p.shape)  # ZeRO-3 leaves an empty placeholder in p.shape
        (decay if len(shape) >= 2 and id(p) not in embeddings else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups
