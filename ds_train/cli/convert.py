"""`ds-train convert …` — checkpoints to Hugging Face, verification, resharding, LoRA merging."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser("convert", help="convert checkpoints (to-hf, verify, reshard, merge-lora)")
    csub = p.add_subparsers(dest="action", required=True, metavar="ACTION")

    t = csub.add_parser("to-hf", help="ZeRO checkpoint → Hugging Face directory (sharded safetensors)")
    t.add_argument(
        "checkpoint", help="run dir, checkpoints/ dir, a step_* dir, or a plain DeepSpeed checkpoint dir"
    )
    t.add_argument("out_dir")
    t.add_argument("--tag", help="checkpoint tag (default: `latest`)")
    t.add_argument(
        "--dtype", choices=["fp32", "bf16", "fp16"], default="fp32", help="dtype of trainable weights"
    )
    t.add_argument("--max-shard-size", default="2GB", help="largest safetensors file (default 2GB)")
    t.add_argument("--model-config", help="HF config (json or dir) for a plain DeepSpeed checkpoint")
    t.add_argument("--tokenizer", help="tokenizer dir to include (default: the checkpoint's)")
    t.add_argument("--verify", action="store_true", help="run `convert verify` on the result")
    t.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists")
    t.set_defaults(func=to_hf)

    v = csub.add_parser("verify", help="compare an HF directory with a checkpoint (tensors and logits)")
    v.add_argument("checkpoint")
    v.add_argument("hf_dir")
    v.add_argument("--tag")
    v.add_argument("--model-config")
    v.set_defaults(func=verify)

    r = csub.add_parser("reshard", help="make an N-rank checkpoint resumable on M ranks (universal format)")
    r.add_argument("checkpoint")
    r.add_argument("out_dir", help="the new run's checkpoints/ directory")
    r.add_argument("--world-size", type=int, required=True)
    r.add_argument("--tag")
    r.set_defaults(func=reshard)

    m = csub.add_parser("merge-lora", help="merge LoRA adapters into their base model → plain HF directory")
    m.add_argument("adapter_dir")
    m.add_argument("out_dir")
    m.add_argument("--base", help="base model HF dir (default: the adapter config's base_model_name_or_path)")
    m.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None)
    m.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists")
    m.set_defaults(func=merge_lora)


def to_hf(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ds_train.cli.shard import parse_size
    from ds_train.config.loader import ConfigError
    from ds_train.convert.to_hf import convert_checkpoint
    from ds_train.convert.zero_layout import CheckpointError

    out = Path(args.out_dir)
    _refuse_to_replace(out, args.force)
    try:
        convert_checkpoint(
            args.checkpoint,
            out,
            tag=args.tag,
            dtype=args.dtype,
            max_shard_bytes=parse_size(args.max_shard_size),
            model_config=args.model_config,
            tokenizer=args.tokenizer,
            verify=args.verify,
        )
    except CheckpointError as e:
        raise ConfigError(str(e)) from None
    print(f"wrote {out}" + (" (verified)" if args.verify else ""))
    return 0


def verify(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ds_train.config.loader import ConfigError
    from ds_train.convert.to_hf import resolve_tag_dir
    from ds_train.convert.verify import verify_conversion
    from ds_train.convert.zero_layout import CheckpointError

    try:
        report = verify_conversion(args.checkpoint, args.hf_dir, tag=args.tag, model_config=args.model_config)
        print(report.render(resolve_tag_dir(args.checkpoint, args.tag), Path(args.hf_dir)))
    except CheckpointError as e:
        raise ConfigError(str(e)) from None
    return 0 if report.ok else 1


def reshard(args: argparse.Namespace) -> int:
    from ds_train.config.loader import ConfigError
    from ds_train.convert.reshard import reshard_checkpoint
    from ds_train.convert.zero_layout import CheckpointError

    try:
        ref = reshard_checkpoint(args.checkpoint, args.out_dir, world_size=args.world_size, tag=args.tag)
    except CheckpointError as e:
        raise ConfigError(str(e)) from None
    print(f"wrote {ref.path}: resumes on {args.world_size} ranks (run.output_dir = {ref.root.parent})")
    return 0


def merge_lora(args: argparse.Namespace) -> int:
    from ds_train.config.loader import ConfigError
    from ds_train.convert.lora import merge_lora_adapters
    from ds_train.convert.zero_layout import CheckpointError

    _refuse_to_replace(args.out_dir, args.force)
    try:
        out = merge_lora_adapters(args.adapter_dir, args.out_dir, base=args.base, dtype=args.dtype)
    except CheckpointError as e:
        raise ConfigError(str(e)) from None
    print(f"wrote {out}")
    return 0


def _refuse_to_replace(out_dir, force: bool) -> None:
    """An existing, non-empty output directory is replaced only with --force."""
    from pathlib import Path

    from ds_train.config.loader import ConfigError

    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise ConfigError(f"{out} exists and is not empty (use --force to replace it)")
