"""`ds-train plan RUN.yaml --world-size N [--device-memory 80GB]`: per-rank memory of each ZeRO
stage / offload / activation-checkpointing choice, and the fastest one that fits."""

from __future__ import annotations

import argparse
import re

UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def parse_size(text: str) -> float:
    """'80GB', '80GiB', '80G', '24e9' → bytes. K/M/G/T are binary: GPU vendors' "80GB" is 80 GiB."""
    m = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([KMGT]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"not a memory size: {text!r} (e.g. 80GB)")
    return float(m.group(1)) * UNITS[m.group(2).upper()]


def register(sub) -> None:
    p = sub.add_parser(
        "plan",
        help="estimate per-rank memory for each ZeRO stage/offload choice and recommend one",
        description=__doc__,
    )
    p.add_argument("config", help="run config YAML")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.micro_batch_size=4")
    p.add_argument("--world-size", type=int, default=1, help="data-parallel ranks (GPUs)")
    p.add_argument("--device-memory", type=parse_size, help="memory of one device, e.g. 80GB")
    p.add_argument(
        "--precision",
        choices=["bf16", "fp16", "fp32"],
        help="default: train.precision; 'auto' plans for bf16 (a GPU)",
    )
    p.add_argument("--seq-len", type=int, help="default: the seq_len of data.train's manifest")
    p.add_argument("--micro-batch", type=int, help="default: train.micro_batch_size")
    p.add_argument(
        "--headroom",
        type=float,
        default=0.1,
        help="fraction of device memory kept free for fragmentation and the CUDA context (default 0.1)",
    )
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from ds_train.config import ConfigError, load_config
    from ds_train.model.build import load_hf_config, load_tokenizer
    from ds_train.objectives.head_loss import LOGIT_TRANSFORMS
    from ds_train.plan.choices import RunSettings, make_plan, render
    from ds_train.plan.memory_estimate import (
        PRECISIONS,
        SUB_GROUP_SIZE,
        BucketSizes,
        HeadLoss,
        with_grad_dtype,
    )
    from ds_train.plan.model_shape import shape_from_config

    cfg = load_config(args.config, args.overrides)
    if args.world_size < 1:
        raise ConfigError("--world-size must be ≥ 1")
    precision = args.precision or (cfg.train.precision if cfg.train.precision != "auto" else "bf16")
    seq_len = args.seq_len or _seq_len_from_data(cfg.data.train)
    micro_batch = args.micro_batch or cfg.train.micro_batch_size
    tokenizer = load_tokenizer(cfg.model)
    hf_config = load_hf_config(cfg.model, tokenizer)
    shape = shape_from_config(hf_config, cfg.model.objective)
    chunk = cfg.model.loss_chunk_tokens
    if any(getattr(hf_config, name, None) not in (None, 1, 1.0) for name in LOGIT_TRANSFORMS):
        chunk = 0  # the model transforms its logits after the head: full logits (head_loss.py)
    loss = HeadLoss(
        chunk_tokens=chunk,
        target_fraction=cfg.data.mlm_probability if cfg.model.objective == "masked_lm" else 1.0,
        bias=shape.head_bias,
    )
    z = cfg.zero
    planned = with_grad_dtype(PRECISIONS[precision], cfg.train.grad_dtype)
    plan = make_plan(
        shape,
        world_size=args.world_size,
        precision=planned,
        micro_batch=micro_batch,
        seq_len=seq_len,
        buckets=BucketSizes(
            z.reduce_bucket_size,
            z.overlap_comm,
            z.stage3_prefetch_bucket_size,
            int((z.ds_config_overrides.get("zero_optimization") or {}).get("sub_group_size", SUB_GROUP_SIZE)),
        ),
        attention=cfg.model.attn_implementation,
        loss=loss,
        device_memory=args.device_memory,
        headroom=args.headroom,
    )
    header = [
        f"model: {shape.params:,} parameters (Ψ), {shape.layers} layers, hidden {shape.hidden}, "
        f"vocab {shape.vocab}",
        f"per rank: {args.world_size} data-parallel rank(s), {planned.name}, micro-batch {micro_batch} × "
        f"seq_len {seq_len}, {cfg.model.attn_implementation} attention, "
        + (f"loss in chunks of {chunk} tokens" if chunk else "loss from full logits")
        + "; GiB per rank "
        "(model states: ZeRO paper formulas, see docs/performance.md)",
    ]
    print(render(plan, header, shape.layers, RunSettings(compile=cfg.model.compile, nvme_path=z.nvme_path)))
    return 0


def _seq_len_from_data(spec) -> int:
    from ds_train.config import ConfigError
    from ds_train.data.shard_set import DataError, load_shard_set, parse_sources

    try:
        return load_shard_set(parse_sources(spec)[0][0]).seq_len
    except (DataError, OSError, IndexError, TypeError) as e:
        raise ConfigError(f"cannot read seq_len from data.train ({e}); pass --seq-len") from None
