"""Start-up: building a fresh model from `model.config`, ds-train's way against transformers'.

Every start of a pretraining run builds its model before the first step, and under Slurm a
preempted job pays that again at each requeue. Three ways, each run in a fresh process, one rank:

  transformers  `from_config` (torch's default init in every layer's constructor, then
                transformers' `_init_weights`), then ds-train's stage-independent
                `initialize_weights`: what ds-train did before model_without_init;
  fresh         `model_without_init` + `initialize_weights`: ds-train's fresh start now;
  resumed       `model_without_init` alone: a resumed run, whose checkpoint replaces every weight.

and, as the floor of any seeded CPU draw of these weights:

  draw          one `normal_` into a fresh fp32 tensor of each parameter's shape, nothing else.

Order rotated every repeat; ratios are of the medians.

`--zero3` times instead `initialize_weights` of a model built partitioned under ZeRO-3 (gloo, one
thread per rank) on 1 and on 2 ranks: on 2, each rank draws half the modules; on 1, rank 0 draws
them all, as every rank-0-draws scheme does whatever the world size.

    .venv/bin/python bench/bench_model_build.py --repeats 3
    .venv/bin/python bench/bench_model_build.py --zero3 --cases llama-125m --repeats 3
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CASES = {
    # bench/gpu.sh's model, the vocabulary padded to 32,768 as there
    "llama-1b": {**json.loads((REPO / "configs/model/llama-1b.json").read_text()), "vocab_size": 32768},
    # a GPT-2-small-sized Llama
    "llama-125m": {"model_type": "llama", "hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 12,
                   "num_attention_heads": 12, "num_key_value_heads": 12, "vocab_size": 32768},
}  # fmt: skip
WAYS = ("transformers", "fresh", "resumed", "draw")


def hf_config(case: str):
    from transformers import AutoConfig

    raw = dict(CASES[case])
    return AutoConfig.for_model(raw.pop("model_type"), **raw)


def run_one(case: str, way: str) -> dict:
    """In a fresh process: build CASE the WAY given; seconds and peak RSS."""
    import torch
    from transformers import AutoModelForCausalLM

    from ds_train.model.build import model_without_init
    from ds_train.model.init import initialize_weights

    config = hf_config(case)
    if way == "draw":
        shapes = [p.shape for p in model_without_init(AutoModelForCausalLM, config).parameters()]
        start = time.perf_counter()
        for shape in shapes:
            torch.empty(shape).normal_(0.0, 0.02)
        return {"params": sum(s.numel() for s in shapes), "build_s": 0.0, "total_s": time.perf_counter() - start,
                "peak_rss_gib": 0.0, "threads": torch.get_num_threads()}  # fmt: skip
    start = time.perf_counter()
    if way == "transformers":
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    else:
        model = model_without_init(AutoModelForCausalLM, config, dtype=torch.float32)
    built = time.perf_counter()
    if way != "resumed":
        initialize_weights(model, seed=1, rank=0)
    done = time.perf_counter()
    params = sum(p.numel() for p in model.parameters())
    return {
        "params": params,
        "build_s": built - start,
        "total_s": done - start,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "threads": torch.get_num_threads(),
    }


def run_zero3(case: str) -> None:
    """On each rank (under torchrun): build CASE partitioned, time initialize_weights."""
    import deepspeed
    import torch
    from transformers import AutoModelForCausalLM

    from ds_train.distributed.engine import HfZeroContext, quiet_deepspeed
    from ds_train.model.build import model_without_init
    from ds_train.model.init import initialize_weights

    quiet_deepspeed()
    deepspeed.init_distributed(dist_backend="gloo")
    world = torch.distributed.get_world_size()
    ds_config = {"train_batch_size": world, "train_micro_batch_size_per_gpu": 1,
                 "zero_optimization": {"stage": 3}}  # fmt: skip
    zero = HfZeroContext(ds_config)
    model = model_without_init(AutoModelForCausalLM, hf_config(case))
    torch.distributed.barrier()
    start = time.perf_counter()
    initialize_weights(model, seed=1, rank=torch.distributed.get_rank())
    torch.distributed.barrier()
    if torch.distributed.get_rank() == 0:
        print(json.dumps({"world": world, "init_s": time.perf_counter() - start}))
    zero.close()


def spawn_zero3(case: str, ranks: int) -> dict:
    from tests.helpers import clean_env, free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}",
           f"--master_port={free_port()}", __file__, "--one-zero3", case]  # fmt: skip
    out = subprocess.run(
        cmd, cwd=REPO, env=clean_env({"OMP_NUM_THREADS": "1"}), capture_output=True, text=True
    )
    if out.returncode:
        raise SystemExit(out.stderr[-2000:])
    return json.loads(next(x for x in reversed(out.stdout.splitlines()) if x.startswith("{")))


def spawn(case: str, way: str) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--one", case, way], cwd=REPO, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--zero3", action="store_true", help="ZeRO-3 initialisation on 1 and 2 ranks")
    ap.add_argument("--one", nargs=2, metavar=("CASE", "WAY"), help=argparse.SUPPRESS)
    ap.add_argument("--one-zero3", metavar="CASE", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(*args.one)))
        return
    if args.one_zero3:
        from process_exit import leave

        run_zero3(args.one_zero3)
        leave()
    if args.zero3:
        for case in args.cases:
            times = {1: [], 2: []}
            for r in range(args.repeats):
                for ranks in (1, 2) if r % 2 == 0 else (2, 1):
                    times[ranks].append(spawn_zero3(case, ranks)["init_s"])
            one, two = statistics.median(times[1]), statistics.median(times[2])
            print(f"{case}: ZeRO-3 initialize_weights, 1 rank {one:.1f} s, 2 ranks {two:.1f} s "
                  f"(2 / 1 = {two / one:.2f}); per repeat 1: {times[1]}, 2: {times[2]}")  # fmt: skip
        return

    results = {}
    for case in args.cases:
        runs: dict[str, list[dict]] = {w: [] for w in WAYS}
        for r in range(args.repeats):
            for way in WAYS[r % len(WAYS) :] + WAYS[: r % len(WAYS)]:
                runs[way].append(spawn(case, way))
        params = runs["fresh"][0]["params"]
        med = {w: statistics.median(x["total_s"] for x in runs[w]) for w in WAYS}
        results[case] = {
            "params": params,
            "median_s": med,
            "transformers_construction_s": statistics.median(x["build_s"] for x in runs["transformers"]),
            "peak_rss_gib": {w: max(x["peak_rss_gib"] for x in runs[w]) for w in WAYS},
            "threads": runs["fresh"][0]["threads"],
        }
    print(f"{'case':<12} {'params':>8} {'transformers':>13} {'fresh':>8} {'resumed':>8} "
          f"{'speed-up fresh':>15} {'speed-up resumed':>17} {'draw floor':>11}")  # fmt: skip
    for case, r in results.items():
        m = r["median_s"]
        print(f"{case:<12} {r['params'] / 1e6:>7.0f}M {m['transformers']:>12.1f}s {m['fresh']:>7.1f}s "
              f"{m['resumed']:>7.1f}s {m['transformers'] / m['fresh']:>14.2f}x "
              f"{m['transformers'] / m['resumed']:>16.1f}x {m['draw']:>10.1f}s")  # fmt: skip
        print(f"{'':<12} (transformers' construction alone {r['transformers_construction_s']:.1f}s; "
              f"peak RSS GiB {', '.join(f'{w} {v:.1f}' for w, v in r['peak_rss_gib'].items() if w != 'draw')}; "
              f"{r['threads']} torch threads)")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
