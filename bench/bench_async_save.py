"""What a periodic checkpoint costs training: foreground saves vs `train.save_async`.

A foreground save stops every rank until its files are written and hashed; a background one only
for the copy to host memory, then a thread writes while training goes on (and competes with it
for the host's cores and memory bandwidth). bench/async_save_probe.py builds one engine (2 ranks,
ds-train's DeepSpeed JSON) and times STEPS training steps alone, after a foreground save, after a
background one copying into the host memory kept from the previous save (the default) and after
one copying into new memory (`train.save_async_keep_memory=false`), order rotated; this prints
each save's cost to training (its time minus the steps alone in the same repeat), the blocking
part, and their ratios. With one rank per two
cores (`--nproc 1`, one thread per rank) the writer has a core of its own, as on a GPU node whose
host cores mostly wait; with two ranks on two cores it competes with training for them.

With `--check`, each stage first runs bench/save_check_probe.py: on this machine's device, the
background checkpoints hold what the foreground ones do and load the same engine state (on a GPU,
through host memory kept between saves: what the CPU tests cannot reach).

    .venv/bin/python bench/bench_async_save.py --stages 2 3 --repeats 8 --steps 4
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
from pathlib import Path

from bench_checkpoint import probe


def copy_rates(gb: float = 2.0, repeats: int = 3) -> dict[str, float]:
    """GB/s of the host copy alone (`HostMemory`, fp32 storages of 400 MB down to 4 MB): into new
    memory (page faults on first touch) and into the memory kept from the copy before."""
    import time

    import torch

    from ds_train.checkpoint.background import HostMemory

    sizes = [100_000_000, 50_000_000, 50_000_000] + [1_000_000] * int(gb * 250 - 200)
    state = [torch.randn(n) for n in sizes]
    nbytes = sum(t.nbytes for t in state) / 1e9
    rates: dict[str, list[float]] = {"new": [], "kept": []}
    for keep, name in ((False, "new"), (True, "kept")):
        memory = HostMemory(keep=keep)
        for _ in range(repeats + 1):
            t0 = time.perf_counter()
            for t in state:
                memory.copy(t.untyped_storage())
            rates[name].append(nbytes / (time.perf_counter() - t0))
            memory.release()
        if keep:
            rates[name] = rates[name][1:]  # the first copy allocates: the new-memory case
    return {k: statistics.median(v) for k, v in rates.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stages", type=int, nargs="+", default=[2, 3])
    ap.add_argument("--repeats", type=int, default=8, help="a multiple of 4: each system goes first as often")
    ap.add_argument("--steps", type=int, default=4, help="training steps timed after each save")
    ap.add_argument(
        "--seq", type=int, default=256, help="tokens per sequence (one sequence per rank and step)"
    )
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--dir", help="where the checkpoints go (default: a temporary directory)")
    ap.add_argument(
        "--check", action="store_true", help="first check the background saves' contents (exits 1 if wrong)"
    )
    ap.add_argument("--json", help="write the measurements (and checks) here")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench_async_save_"))
    rows, results = [], {"copy_gb_per_s": copy_rates()}
    rate = results["copy_gb_per_s"]
    print(
        f"host copy alone: {rate['new']:.1f} GB/s into new memory, {rate['kept']:.1f} GB/s into kept memory",
        flush=True,
    )
    for stage in args.stages:
        if args.check:  # exits with the probe's output if a check fails
            check = probe(args, tmp, stage, "save_check_probe.py", (str(args.seq),))
            results[f"check_stage{stage}"] = check
            print(
                f"ZeRO-{stage} check on {check['device']}: ok={check['ok']} {json.dumps(check)}", flush=True
            )
        p = probe(args, tmp, stage, "async_save_probe.py", (str(args.steps), str(args.seq)))
        results[f"stage{stage}"] = p
        t, stalls = p["times"], p["stalls"]
        base = statistics.median(t["train"])
        # each repeat's save against the steps alone in the same repeat (minutes apart at most):
        # the machine's drift over the run cancels
        cost = {
            s: statistics.median(x - y for x, y in zip(v, t["train"], strict=True))
            for s, v in t.items()
            if s != "train"
        }
        stall = {s: statistics.median(v) for s, v in stalls.items()}
        rows.append(
            f"| {stage} | {p['psi'] / 1e6:,.0f} M | {p['bytes'] / 1e9:.2f} GB | {base / args.steps:.2f} | "
            f"{stall['sync']:.2f} | {cost['sync']:.2f} | {stall['async']:.2f} | {cost['async']:.2f} | "
            f"**{cost['async'] / cost['sync']:.2f}×** | {stall['async_fresh']:.2f} | {cost['async_fresh']:.2f} | "
            f"**{stall['async_fresh'] / stall['async']:.2f}×** | {p['completed_after_steps']} |"
        )
        print(
            rows[-1], "(per repeat, s:", {k: [round(x, 2) for x in v] for k, v in t.items()}, ")", flush=True
        )
    shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=1))
    print(
        f"\n{args.nproc} ranks, {args.precision}, seq {args.seq}, {args.steps} steps after each save, medians of "
        f"{args.repeats} (seconds, barrier to barrier), checkpoints in {args.dir or tempfile.gettempdir()}"
    )
    print(
        "| ZeRO | params | checkpoint | step s | foreground: blocks s | foreground: costs s | "
        "background: blocks s | background: costs s | cost ratio | new memory: blocks s | new memory: costs s | "
        "blocks, new / kept memory | background completed after step |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
