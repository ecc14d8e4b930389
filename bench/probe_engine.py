"""ds-train's engine built exactly as `ds-train pretrain` builds it, for the probes that measure
one (memory_probe.py, checkpoint_probe.py): the DeepSpeed JSON from the builder, build_model,
param_groups, build_engine; a constant learning rate."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class ProbeEngine:
    cfg: Any
    ctx: Any
    ds_config: dict
    hf_config: Any
    zero_ctx: Any  # keep alive while the engine lives; close() at the end
    model: Any
    engine: Any
    psi: int  # parameters


def build_probe_engine(cfg_path: str) -> ProbeEngine:
    from ds_train.config import load_config
    from ds_train.distributed.deepspeed_config import build_deepspeed_config
    from ds_train.distributed.engine import HfZeroContext, build_engine, init_distributed
    from ds_train.distributed.launch_env import detect
    from ds_train.model.build import build_model, load_hf_config, load_tokenizer
    from ds_train.model.flops import count_params
    from ds_train.train.optimizer_groups import param_groups

    cfg = load_config(cfg_path)
    ctx = init_distributed(detect(), 600)
    ds_config = build_deepspeed_config(cfg, ctx.world_size)
    hf_config = load_hf_config(cfg.model, load_tokenizer(cfg.model))
    zero_ctx = HfZeroContext(ds_config)
    model = build_model(cfg.model, hf_config, seed=cfg.run.seed, rank=ctx.rank)
    psi = count_params(model)[0]
    engine = build_engine(
        model,
        param_groups(model, cfg.train.weight_decay, cfg.train.embedding_weight_decay),
        ds_config,
        lambda step: 1.0,
    )
    return ProbeEngine(cfg, ctx, ds_config, hf_config, zero_ctx, model, engine, psi)
