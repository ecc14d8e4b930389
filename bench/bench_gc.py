"""Python's garbage collector in the training loop: automatic (train.gc_every=0) vs ds-train's
collection at fixed steps with start-up objects frozen (train.gc_every=N, the default 50).

Both modes run `ds-train pretrain` on 2 ranks (bench/ds_train_loop.py, bench_trainer's model and
config), alternating within each repeat. Printed per mode: rank 0's collections inside the timed
steps by generation, their summed and longest pause, and tokens/s; then the cost of one full
collection of a process with torch, transformers and DeepSpeed loaded and the model built, before
and after `gc.freeze()` — what an automatic full collection stalls a rank for.

    .venv/bin/python bench/bench_gc.py --repeats 2 --steps 200
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_trainer import REPO, add_loop_args, launch_loop, loop_workspace, run_config

MODES = {"automatic": 0, "every 50 steps, frozen": 50}


def full_collection_cost() -> dict:
    """A full collection in a process like a rank's, before and after freezing what exists."""
    import gc
    import subprocess

    probe = (
        "import gc, time, deepspeed, transformers, torch, json\n"
        "from transformers import AutoConfig, AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained('{REPO}/configs/model/tiny-llama.json'))\n"
        "def t():\n"
        "    s = time.perf_counter(); gc.collect(); return time.perf_counter() - s\n"
        "t(); before = min(t() for _ in range(3)); gc.freeze(); after = min(t() for _ in range(3))\n"
        "print(json.dumps({'objects': len(gc.get_objects()) + gc.get_freeze_count(), 'full_s': before, 'frozen_s': after}))\n"
    )
    del gc
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_loop_args(ap, steps=200, seq_len=256)
    args = ap.parse_args()
    tmp, model, opts = loop_workspace(args, "bench_gc_")
    runs: dict[str, list[dict]] = {m: [] for m in MODES}
    for r in range(args.repeats):
        for mode in list(MODES)[r % 2 :] + list(MODES)[: r % 2]:
            cfg = run_config(opts, model, tmp / f"r{r}_{MODES[mode]}", 2, "ds_train")
            cfg["train"]["gc_every"] = MODES[mode]
            res = launch_loop(cfg, tmp / f"r{r}_{MODES[mode]}.yaml", args)
            runs[mode].append(res)
            print(f"repeat {r} {mode}: {res['tokens_per_s']:,.0f} tok/s, collections {res['gc_collections']}, "
                  f"pause {1e3 * res['gc_pause_s']:.1f} ms (longest {1e3 * res['gc_pause_max_s']:.1f})", flush=True)  # fmt: skip
    cost = full_collection_cost()
    timed = args.steps - args.warmup
    print(
        f"\n{'mode':<24} {'tok/s':>8} {'gen0':>6} {'gen1':>6} {'gen2':>6} {'pause/step':>11} {'longest':>9}"
    )
    for mode, rs in runs.items():
        gens = [statistics.median(int(x["gc_collections"][str(g)]) for x in rs) for g in (0, 1, 2)]
        tps = statistics.median(x["tokens_per_s"] for x in rs)
        per_step = statistics.median(x["gc_pause_s"] for x in rs) / timed
        longest = max(x["gc_pause_max_s"] for x in rs)
        print(f"{mode:<24} {tps:>8,.0f} {gens[0]:>6.0f} {gens[1]:>6.0f} {gens[2]:>6.0f} "
              f"{1e3 * per_step:>8.2f} ms {1e3 * longest:>6.1f} ms")  # fmt: skip
    ratio = statistics.median(x["tokens_per_s"] for x in runs["every 50 steps, frozen"]) / statistics.median(
        x["tokens_per_s"] for x in runs["automatic"]
    )
    print(f"tokens/s every-50 / automatic: {ratio:.3f} (rank 0's timed steps: {timed} per run)")
    print(f"one full collection with {cost['objects']:,} objects tracked: {1e3 * cost['full_s']:.1f} ms; "
          f"after gc.freeze(): {1e3 * cost['frozen_s']:.2f} ms")  # fmt: skip
    if args.json:
        Path(args.json).write_text(
            json.dumps({"args": vars(args), "runs": runs, "full_collection": cost}, indent=1)
        )


if __name__ == "__main__":
    main()
