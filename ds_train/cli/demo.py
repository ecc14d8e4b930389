"""`ds-train demo` — the embedded default: corpus → shards → 2-rank ZeRO-3 pretraining → HF export."""

from __future__ import annotations

from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("demo", help="run the offline end-to-end demo on stdlib docstrings")
    p.add_argument("--output", default="runs/demo", help="where corpus, shards, run and export go")
    p.add_argument(
        "--steps", type=int, default=None, help="override train.max_steps (default: the run config's)"
    )
    p.add_argument("--nproc", type=int, default=2, help="local ranks (default 2)")
    p.add_argument(
        "--keep", action="store_true", help="resume the previous demo run instead of starting fresh"
    )
    p.add_argument(
        "--skip-finetune", action="store_true", help="stop after pretraining (no fine-tuning stages)"
    )
    p.set_defaults(func=main)


def main(args) -> int:
    from ds_train.demo.pipeline import run_demo

    return run_demo(
        Path(args.output), steps=args.steps, nproc=args.nproc, keep=args.keep, finetune=not args.skip_finetune
    )
