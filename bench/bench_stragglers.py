"""Straggler detection: does metrics.jsonl name a rank whose forwards are slowed, how slow must it
be, what does it cost the job, and how often does a healthy run read over train.straggler_ratio?

Each ZeRO stage: one healthy 2-rank `ds-train pretrain` run (its forward time per micro-batch sets
the delays), then runs in which rank 1's forwards take a given fraction longer
(DS_TRAIN_FAULT=slow@step=1,rank=1,ms=…: sleeps inside its linear layers, as a throttled GPU's
slower kernels would be), alternating with healthy repeats. Stage `3g` is ZeRO-3 gathering every
parameter layer by layer (prefetch bucket 1, persistence threshold 0), as for a model many times
its prefetch bucket; plain `3` keeps the defaults, under which this small model is prefetched
whole at the start of each forward. Per run, over its log lines after the
first: the share naming rank 1 as the slowest, the median slowest_forward_ratio, whether rank 0
warned, and tokens/s against the healthy runs' median (what one slow rank costs every rank).
Also the clock's own cost per forward, timed in this process.

    .venv/bin/python bench/bench_stragglers.py --stages 2 3 3g --slowdowns 0.1 0.25 1.0
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench_trainer import model_config  # noqa: E402  bench/, this script's directory, is on sys.path
from synthetic_shards import synthetic_shards  # noqa: E402

from tests.helpers import read_metrics, torchrun  # noqa: E402


def run_config(args, model: Path, shards: Path, run_dir: Path, stage: str) -> dict:
    zero: dict = {"stage": int(stage[0])}
    if stage == "3g":
        zero.update(stage3_prefetch_bucket_size=1, stage3_param_persistence_threshold=0)
    return {
        "run": {"output_dir": str(run_dir), "tensorboard": False, "seed": 1},
        "model": {"config": str(model), "tokenizer": str(REPO / "configs/tokenizers/stdlib-bpe-4k")},
        "data": {"train": str(shards), "num_workers": 0},
        "train": {
            "max_steps": args.steps,
            "global_batch_size": args.global_batch,
            "micro_batch_size": args.micro_batch,
            "precision": "fp32",
            "log_every": args.log_every,
            "save_every": 0,
        },
        "zero": zero,
    }


def launch(cfg: dict, path: Path, fault: str | None) -> dict:
    path.write_text(yaml.safe_dump(cfg))
    proc = torchrun(["pretrain", path], env={"DS_TRAIN_FAULT": fault} if fault else None, timeout=1800)
    lines = [r for r in read_metrics(Path(cfg["run"]["output_dir"])) if "loss" in r][1:]  # after the first
    return {
        "fault": fault,
        "named_rank_1": sum(r["slowest_rank"] == 1 for r in lines) / len(lines),
        "ratio": statistics.median(r["slowest_forward_ratio"] for r in lines),
        "ratios": [r["slowest_forward_ratio"] for r in lines],
        "forward_s": statistics.median(r["forward_s"] for r in lines),
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in lines),
        "warnings": sum("is a straggler" in line for line in proc.stderr.splitlines()),
    }


def run_once(args, model: Path, shards: Path, run_dir: Path, stage: str, fault: str | None) -> dict:
    run = {
        "name": run_dir.name,
        **launch(run_config(args, model, shards, run_dir, stage), run_dir.with_suffix(".yaml"), fault),
    }
    print(
        f"ZeRO-{stage} {run_dir.name}: rank 1 named in {100 * run['named_rank_1']:.0f}% of lines, median ratio "
        f"{run['ratio']:.2f}, {run['warnings']} warning(s), {run['tokens_per_s']:,.0f} tok/s",
        flush=True,
    )
    return run


def clock_cost_ns(n: int = 100_000) -> float:
    """One `with clock:` around a forward (ZeRO 0-2), in ns."""
    import torch

    from ds_train.train.stragglers import ForwardClock

    clock = ForwardClock(torch.device("cpu"))
    t0 = time.perf_counter()
    for _ in range(n):
        with clock:
            pass
    return (time.perf_counter() - t0) / n * 1e9


def layer_hook_cost_ns(layers: int = 100, n: int = 2000) -> float:
    """What timing by layer (ZeRO-3) adds per linear layer and forward, in ns: forwards of 100
    1x1 linear layers (next to no compute) with and without the hooks, alternating."""
    import torch

    from ds_train.train.stragglers import ForwardClock

    plain = torch.nn.Sequential(*(torch.nn.Linear(1, 1) for _ in range(layers)))
    hooked = torch.nn.Sequential(*(torch.nn.Linear(1, 1) for _ in range(layers)))
    ForwardClock(torch.device("cpu")).time_linear_layers(hooked)
    x = torch.ones(1, 1)
    spent = {"plain": [], "hooked": []}
    with torch.no_grad():
        for _ in range(5):
            for name, model in (("plain", plain), ("hooked", hooked)):
                t0 = time.perf_counter()
                for _ in range(n // 5):
                    model(x)
                spent[name].append((time.perf_counter() - t0) / (n // 5))
    return (min(spent["hooked"]) - min(spent["plain"])) / layers * 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stages", nargs="+", default=["2", "3", "3g"], choices=["0", "1", "2", "3", "3g"])
    ap.add_argument("--slowdowns", type=float, nargs="+", default=[0.1, 0.25, 0.5, 1.0])
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--log-every", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--global-batch", type=int, default=16)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--json", help="write all measurements here")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench_stragglers_"))
    model = model_config(tmp / "model.json", args.hidden, args.layers, args.seq_len)
    shards = synthetic_shards(tmp / "shards", rows=args.global_batch * (args.steps + 4), seq_len=args.seq_len)
    results: dict = {"args": vars(args), "loadavg_start": os.getloadavg(), "clock_ns": clock_cost_ns()}
    results["layer_hook_ns"] = layer_hook_cost_ns()
    print(
        f"clock cost (CPU): {results['clock_ns']:.0f} ns per forward (ZeRO 0-2); timing by layer (ZeRO-3) "
        f"{results['layer_hook_ns']:.0f} ns per linear layer and forward",
        flush=True,
    )
    for stage in args.stages:

        def run_dir(name: str, stage: str = stage) -> Path:
            return tmp / f"s{stage}_{name}"

        runs = [run_once(args, model, shards, run_dir("healthy_0"), stage, None)]
        micro_per_step = args.global_batch // args.micro_batch // 2  # 2 ranks
        per_forward_s = runs[0]["forward_s"] / micro_per_step
        for i, slowdown in enumerate(args.slowdowns):
            ms = max(1, round(1000 * slowdown * per_forward_s))
            fault = f"slow@step=1,rank=1,ms={ms}"
            runs.append(
                {
                    **run_once(args, model, shards, run_dir(f"slow_{slowdown:g}"), stage, fault),
                    "slowdown": slowdown,
                }
            )
            runs.append(run_once(args, model, shards, run_dir(f"healthy_{i + 1}"), stage, None))
        base = statistics.median(r["tokens_per_s"] for r in runs if r["fault"] is None)
        for r in runs:
            r["tokens_per_s_vs_healthy"] = r["tokens_per_s"] / base
        healthy_ratios = [q for r in runs if r["fault"] is None for q in r["ratios"]]
        results[f"zero{stage}"] = {
            "runs": runs,
            "forward_ms": 1e3 * per_forward_s,
            "healthy_ratio_median": statistics.median(healthy_ratios),
            "healthy_over_1.2": sum(q >= 1.2 for q in healthy_ratios) / len(healthy_ratios),
        }
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))
    results["loadavg_end"] = os.getloadavg()
    print(f"\nload average at start {results['loadavg_start']}, at end {results['loadavg_end']}")
    print(
        "\n| ZeRO | rank 1's forwards | lines naming rank 1 | median slowest/others | warned | tok/s vs healthy |"
    )
    print("|---|---|---|---|---|---|")
    for stage in args.stages:
        res = results[f"zero{stage}"]
        for r in res["runs"]:
            what = (
                "healthy"
                if r["fault"] is None
                else f"+{100 * r['slowdown']:.0f}% ({r['fault'].split('ms=')[1]} ms)"
            )
            print(
                f"| {stage} | {what} | {100 * r['named_rank_1']:.0f}% | {r['ratio']:.2f} | "
                f"{'yes' if r['warnings'] else 'no'} | {r['tokens_per_s_vs_healthy']:.3f} |"
            )
        print(
            f"| {stage} | healthy lines reading ≥ 1.2 (false alarms at the default) | "
            f"{100 * res['healthy_over_1.2']:.0f}% | {res['healthy_ratio_median']:.2f} | | |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
