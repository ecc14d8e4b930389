"""`ds-train pretrain CONFIG.yaml [section.key=value ...]` on every rank, under any launcher."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser(
        "pretrain",
        help="pretrain a causal or masked LM from a run config",
        description="Pretrain from a YAML run config; re-running on the same run.output_dir resumes.",
    )
    add_run_arguments(p)
    p.set_defaults(func=main)


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="run config YAML (see configs/runs/)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=20 zero.stage=3")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument(
        "--check",
        action="store_true",
        help="run every check (config, paths, batch arithmetic, resume) and exit",
    )
    p.add_argument(
        "--world-size",
        type=int,
        metavar="N",
        help="with --check: check the batch arithmetic and resume for N ranks (default: this launch's)",
    )


def main(args: argparse.Namespace) -> int:
    from ds_train.checkpoint.start_point import start_note
    from ds_train.config import dump_yaml, load_config
    from ds_train.train import pretrain
    from ds_train.train.epochs import steps_line

    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        print(dump_yaml(cfg), end="")
        return 0
    if args.check:
        pre = pretrain.check(cfg, world_size=args.world_size)
        print(
            f"ok: {pre.layout.global_batch_size} = {pre.layout.micro_batch_size} micro × {pre.layout.grad_accum} "
            f"accum × {pre.layout.data_parallel_size} ranks; {steps_line(cfg)}"
            + (f"; {start_note(pre.resume_from, cfg.run.output_dir)}" if pre.resume_from else "")
        )
        return 0
    return pretrain.run(cfg)
