"""`ds-train data order|show|verify`: look at the data stream a run config defines, without training.

- `order CONFIG [overrides] --steps N --world-size W`: per global step, the (shard, row) of every
  sample of that global batch, computed by the loader's own code (rank_positions + the plan's
  locate). The output does not depend on W: that is the elastic-resume guarantee, made visible.
- `show CONFIG [overrides] --step S`: the text of the samples of one global step (find the batch
  behind a loss spike).

  Both number steps as the training log and metrics.jsonl do: step 1 is the first update. Where
  `run.output_dir` holds a run resumed with `run.force_resume` onto other data or another batch,
  they follow its data_stream.jsonl, and refuse steps this config did not train.
- `verify DIR`: every shard of a local shard set against its manifest (size, sha256, structure).
"""

from __future__ import annotations

import argparse
import json


def register(sub) -> None:
    p = sub.add_parser("data", help="inspect the data order of a run config, verify shard sets")
    dsub = p.add_subparsers(dest="action", required=True)

    o = dsub.add_parser("order", help="print the (shard, row) ids of each global batch")
    _run_arguments(o)
    o.add_argument("--steps", type=int, default=10, help="global steps to print (default 10)")
    o.add_argument("--start-step", type=int, default=1, help="first step to print (1: the first update)")
    o.add_argument("--world-size", type=int, default=1, help="data-parallel ranks (output is the same)")
    o.add_argument("--json", action="store_true", help="one JSON object per step")
    o.set_defaults(func=order)

    s = dsub.add_parser("show", help="decode the samples of one global step")
    _run_arguments(s)
    s.add_argument("--step", type=int, required=True, help="the step as logged (1: the first update)")
    s.add_argument("--max-chars", type=int, default=300, help="characters per sample (0: all)")
    s.set_defaults(func=show)

    v = dsub.add_parser("verify", help="check every shard of a shard set against its manifest")
    v.add_argument("shards", help="shard directory (or index.json, or a brace pattern)")
    v.add_argument("--no-checksums", action="store_true", help="structure and sizes only (fast)")
    v.add_argument("--threads", type=int, default=4)
    v.set_defaults(func=verify)


def _run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="run config YAML")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.train=shards/train")
    p.add_argument("--valid", action="store_true", help="data.valid instead of data.train")


def _plan_and_positions(args: argparse.Namespace, world_size: int):
    import numpy as np

    from ds_train.config import ConfigError, load_config
    from ds_train.data.loader import build_plan, global_batch_positions
    from ds_train.data.stream_origin import origin_at, read_history
    from ds_train.distributed.deepspeed_config import batch_layout

    cfg = load_config(args.config, args.overrides)
    spec = cfg.data.valid if args.valid else cfg.data.train
    if spec in (None, "", []):
        raise ConfigError(f"data.{'valid' if args.valid else 'train'} is not set")
    # the same arguments pretrain passes (train/pretrain.py: _plan_on_rank0)
    shuffle = cfg.data.shuffle and not args.valid
    plan = build_plan(
        spec, seed=cfg.data_seed, shuffle=shuffle, window=cfg.data.shuffle_window, evaluation=args.valid
    )
    layout = batch_layout(cfg.train, world_size)
    if args.valid:  # evaluation reads whole global batches, ramp or not (train/pretrain.py)
        layout = layout.steady
    history = [] if args.valid else read_history(cfg.run.output_dir)

    def positions(step: int) -> np.ndarray:
        """The global batch of the step logged as `step` (the loader counts from 0)."""
        if step < 1:
            raise ConfigError(f"step {step}: steps count from 1, as the training log does")
        try:
            origin = origin_at(history, step - 1, plan.fingerprint, layout.schedule)
        except ValueError as e:
            raise ConfigError(f"{cfg.run.output_dir}: {e}") from None
        return global_batch_positions(step - 1, layout, origin)

    return cfg, plan, positions


def order(args: argparse.Namespace) -> int:
    from ds_train.config import ConfigError

    if args.world_size < 1 or args.steps < 0 or args.start_step < 1:
        raise ConfigError("--world-size and --start-step must be ≥ 1, --steps ≥ 0")
    _, plan, batch_positions = _plan_and_positions(args, args.world_size)
    multi = len(plan.sources) > 1
    for step in range(args.start_step, args.start_step + args.steps):
        source, shard, row = plan.locate(batch_positions(step))
        if args.json:
            samples = [
                {"source": int(a), "shard": plan.sources[a].names[b], "row": int(r)}
                for a, b, r in zip(source.tolist(), shard.tolist(), row.tolist())
            ]
            print(json.dumps({"step": step, "samples": samples}))
            continue
        ids = [
            (f"{a}:" if multi else "") + f"{plan.sources[a].names[b]}:{r}"
            for a, b, r in zip(source.tolist(), shard.tolist(), row.tolist())
        ]
        print(f"step {step}: {' '.join(ids)}")
    return 0


def show(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ds_train.data.reader import RowReader
    from ds_train.model.build import load_tokenizer

    cfg, plan, batch_positions = _plan_and_positions(args, 1)
    tokenizer = load_tokenizer(cfg.model)
    positions = batch_positions(args.step)
    source, shard, row = plan.locate(positions)
    cache = cfg.data.cache_dir or str(Path(cfg.run.output_dir) / "shard_cache")  # as pretraining
    rows, _ = RowReader(plan.sources, cache).read(source, shard, row)
    for p, a, b, r, tokens in zip(positions, source, shard, row, rows):
        text = tokenizer.decode(tokens[:-1].tolist())
        if args.max_chars:
            text = text[: args.max_chars]
        print(f"--- step {args.step} sample {p}: {plan.describe(int(a), int(b), int(r))}\n{text}")
    return 0


def verify(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ds_train.data.verify import verify_shard_set

    bar = tqdm(unit=" shards", desc="verify", disable=None)
    try:
        shard_set, problems = verify_shard_set(
            args.shards, checksums=not args.no_checksums, threads=args.threads, on_shard=lambda: bar.update(1)
        )
    finally:
        bar.close()
    for p in problems:
        print(f"BAD {p.name}: {p.problem}")
    checked = "sizes, structure" + ("" if args.no_checksums else ", sha256")
    print(
        f"{len(shard_set.names) - len(problems)}/{len(shard_set.names)} shards ok ({checked}) in "
        f"{shard_set.location}"
    )
    return 1 if problems else 0
