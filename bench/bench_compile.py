"""`model.compile` (torch.compile per transformer block) against eager and against compiling the
whole model (DeepSpeed's `engine.compile()`): compile time, and step time once compiled.

Each run is one `ds-train pretrain` process (bench/ds_train_loop.py: 1 rank, ZeRO-2, fp32 on CPU)
on the same synthetic shards, at two depths, so the compile's growth with depth shows: per-block
compilation traces one block for all of them, whole-model compilation traces every block. Each
compiled run starts from an empty inductor cache (cold, as a first job does); `--warm` adds a
second run on the cache the first left (as a requeued job that keeps TORCHINDUCTOR_CACHE_DIR).
Compile time is the first step's start-up (`first_step_s`) minus eager's; the step-time ratio is
of median steps after warm-up. On CPU inductor writes C++ where a GPU gets Triton kernels: the
compile seconds are this machine's; what carries over is how they grow with depth.

    .venv/bin/python bench/bench_compile.py --layers 4 16 --warm
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench_trainer import model_config  # noqa: E402
from gpu_bench import TOKENIZER, Variant, run_variant, synthetic_shards  # noqa: E402

MODES = {
    "eager": Variant("eager", "-", "eager"),
    "blocks": Variant("blocks", "-", "model.compile", ["model.compile=true"]),
    "whole_model": Variant("whole_model", "-", "engine.compile()", compile=True),
}


def run(args, shards: Path, model: Path, mode: str, cache: Path, out: Path) -> dict:
    cfg = {
        "run": {"output_dir": str(out), "seed": 1, "tensorboard": False},
        "model": {"config": str(model), "tokenizer": str(TOKENIZER), "pad_vocab_multiple": 128},
        "data": {"train": str(shards), "num_workers": 0},
        "train": {"max_steps": args.steps, "global_batch_size": args.micro, "micro_batch_size": args.micro,
                  "precision": "fp32", "log_every": args.warmup, "save_every": 0, "warmup_steps": 2},
        "zero": {"stage": 2},
    }  # fmt: skip
    path = out.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(cfg))
    v = MODES[mode]
    r = run_variant(args, path, v, v.overrides, out, inductor_cache=cache)
    if "error" in r:
        raise SystemExit(f"{mode} failed: {r['error']}")
    return {
        "first_step_s": r["first_step_s"],
        "step_s": statistics.median(r["step_times"]),
        "loss": r["loss"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, nargs="+", default=[4, 16])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--micro", type=int, default=4)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--warm", action="store_true", help="rerun each compiled mode on its filled cache")
    ap.add_argument("--json", help="write all measurements here")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench_compile_"))
    shards = synthetic_shards(tmp / "shards", rows=args.micro * args.steps * 2, seq_len=args.seq_len)
    results: dict[str, dict] = {}
    print(
        f"hidden {args.hidden}, seq {args.seq_len}, micro {args.micro}, {args.steps} steps ({args.warmup} warm-up)"
    )
    print(
        f"{'layers':>6} {'mode':<12} {'1st step':>9} {'compile':>8} {'warm 1st':>9} {'warm compile':>12} {'step':>8} {'vs eager':>8}"
    )
    for layers in args.layers:
        model = model_config(tmp / f"model_{layers}.json", args.hidden, layers, args.seq_len)
        for mode in MODES:
            cache = tmp / f"inductor_{layers}_{mode}"  # empty: a cold compile
            r = run(args, shards, model, mode, cache, tmp / f"run_{layers}_{mode}")
            if args.warm and mode != "eager":
                r["warm_first_step_s"] = run(args, shards, model, mode, cache, tmp / f"warm_{layers}_{mode}")[
                    "first_step_s"
                ]
            results[f"{layers}/{mode}"] = r
            eager = results[f"{layers}/eager"]
            compile_s = r["first_step_s"] - eager["first_step_s"]
            warm = r.get("warm_first_step_s")
            warm_cols = ("", "") if warm is None else (f"{warm:.1f}s", f"{warm - eager['first_step_s']:.1f}s")
            print(f"{layers:>6} {mode:<12} {r['first_step_s']:>8.1f}s {compile_s:>7.1f}s {warm_cols[0]:>9} "
                  f"{warm_cols[1]:>12} {1000 * r['step_s']:>6.0f}ms {eager['step_s'] / r['step_s']:>7.2f}x",
                  flush=True)  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))


if __name__ == "__main__":
    main()
