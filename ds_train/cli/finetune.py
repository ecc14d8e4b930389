"""`ds-train finetune CONFIG.yaml [section.key=value ...]` on every rank, under any launcher."""

from __future__ import annotations

import argparse

from ds_train.cli.pretrain import add_run_arguments


def register(sub) -> None:
    p = sub.add_parser(
        "finetune",
        help="fine-tune a model (SFT, classification, masked-LM; full or LoRA) from a run config",
        description=(
            "Fine-tune from a YAML run config with a `finetune` section (docs/finetune.md); "
            "model.init_from is an HF directory or a `ds-train pretrain` run directory. "
            "Re-running on the same run.output_dir resumes."
        ),
    )
    add_run_arguments(p)
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from ds_train.checkpoint.start_point import start_note
    from ds_train.config import dump_yaml, load_config
    from ds_train.finetune import preflight, run
    from ds_train.train.epochs import steps_line

    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        print(dump_yaml(cfg), end="")
        return 0
    if args.check:
        pre = preflight.check(cfg, world_size=args.world_size)
        splits = ", ".join(
            f"{name}: {', '.join(spec.files)} ({_tokenized(pre.split_stats[name])})"
            for name, spec in pre.specs.items()
        )
        if pre.shard_sets is not None:  # SFT shards
            splits = ", ".join(
                f"{n}: {', '.join(s.describe() for s in v)}" for n, v in pre.shard_sets.items()
            )
        print(
            f"ok: task {cfg.finetune.task} | {pre.layout.global_batch_size} = {pre.layout.micro_batch_size} micro × "
            f"{pre.layout.grad_accum} accum × {pre.layout.data_parallel_size} ranks | {steps_line(cfg)} | {splits}"
            + (f" | classes {pre.class_names}" if pre.class_names else "")
            + (f" | {start_note(pre.resume_from, cfg.run.output_dir)}" if pre.resume_from else "")
        )
        return 0
    return run.run(cfg)


def _tokenized(stats: dict) -> str:
    """What tokenizing a split gave, for the --check line: rows, and the examples lost or cut."""
    out = f"{stats['examples']} examples → {stats['rows']} rows"
    lost = {k: stats.get(k, 0) for k in ("truncated", "at_seq_len_limit", "dropped_no_target")}
    return out + "".join(f", {v} {k.replace('_', ' ')}" for k, v in lost.items() if v)
