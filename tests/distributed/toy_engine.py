"""A DeepSpeed engine around a toy model, as ds-train builds one (two parameter groups, AdamW,
clipping), for tests that look inside DeepSpeed's step at each ZeRO stage."""

from __future__ import annotations

import torch


def toy_engine(
    model: torch.nn.Module,
    stage: int,
    precision: str,
    world: int,
    *,
    offload: bool = False,
    accumulation: int = 1,
    fp32_grads: bool = False,
):
    """`model` under DeepSpeed at ZeRO `stage` on `world` ranks, micro-batches of 2 (`offload`:
    DeepSpeed's CPU Adam; `fp32_grads`: fp32 gradient accumulation of bf16 parameters)."""
    from ds_train.distributed.engine import build_engine

    ds_config = {
        "train_batch_size": 2 * accumulation * world,
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": accumulation,
        "gradient_clipping": 1.0,
        "optimizer": {"type": "AdamW", "params": {"lr": 0.05, "weight_decay": 0.1}},
        "zero_optimization": {
            "stage": stage,
            **({"offload_optimizer": {"device": "cpu"}} if offload else {}),
        },
        "zero_allow_untested_optimizer": True,
        **({"bf16": {"enabled": True}} if precision == "bf16" else {}),
        **({"data_types": {"grad_accum_dtype": "fp32"}} if fp32_grads else {}),
    }
    # two groups, as ds-train's (ZeRO-1/2 step the optimizer once per group)
    groups = [
        {"params": [p for p in model.parameters() if p.ndim == 2], "weight_decay": 0.1},
        {"params": [p for p in model.parameters() if p.ndim == 1], "weight_decay": 0.0},
    ]
    return build_engine(model, groups, ds_config, lambda step: 1.0)
