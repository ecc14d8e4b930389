"""The part of each parameter's gradient and fp32 master weight that this rank holds, per ZeRO stage.

Per-layer norms (train/per_layer_norms.py) add up the squares of these local pieces and all-reduce one
small vector. DeepSpeed's public `safe_get_full_grad` would gather each parameter's full gradient
instead, one collective of the parameter's size per parameter. Each element is held by exactly
one rank:

- ZeRO-3: the parameter's partition, through DeepSpeed's local API;
- ZeRO-1/2 and the bf16 optimizer (bf16 at stage 0): the fragment that this rank's optimizer
  partition covers (the parameter's `_hp_mapping`, which DeepSpeed's universal checkpoints also
  use; None where this rank covers none of it);
- stage 0 in fp32 or fp16: every rank holds full gradients, so only rank 0 counts them.

Valid after the step's last backward and before engine.step(), which frees the reduced gradients.
In fp16 the gradients are still multiplied by the loss scale there: `loss_scale` says by how much.
"""

from __future__ import annotations

from typing import Any

import torch


def local_pieces(param: torch.nn.Parameter, rank: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(gradient, fp32 master weight) elements of `param` held by this rank; (None, None) for none."""
    if hasattr(param, "ds_id"):  # ZeRO-3
        optimizer = param._z3_optimizer
        return optimizer.get_local_fp32_grad_for_param(param), optimizer.get_local_fp32_param(param)
    if hasattr(param, "_hp_mapping"):  # ZeRO-1/2, bf16 optimizer
        mapping = param._hp_mapping
        if mapping is None:
            return None, None
        grad = mapping.get_lp_grad_fragment(param._index_in_param_group)
        if grad.numel() == param.numel():
            # the bf16 optimizer keeps a full-size accumulation buffer on every rank: its
            # fragment is the part this rank's partition covers (as get_full_hp_grad cuts it)
            address = mapping.lp_fragment_address
            grad = grad.flatten().narrow(0, address.start, address.numel)
        return grad, mapping.get_hp_fragment()
    if rank == 0:  # stage 0 without a partitioning optimizer: full, identical gradients everywhere
        return param.grad, param.detach()
    return None, None


def loss_scale(engine: Any) -> float:
    """What the gradients are multiplied by before engine.step() unscales them (fp16 only)."""
    if not engine.fp16_enabled():
        return 1.0
    optimizer = engine.optimizer
    scale = getattr(optimizer, "loss_scale", None) or getattr(optimizer, "cur_scale", None)
    return float(scale or 1.0)
