"""Memory: per-rank model states measured on DeepSpeed vs the ZeRO paper's formulas.

For each precision, ZeRO stage and world size, bench/memory_probe.py builds ds-train's engine,
steps once, accumulates the next micro-batch's gradients, and counts every tensor storage the
model and optimizer hold (params, grads, optimizer state incl. the fp32 master copy, buffers).
This prints the measured bytes per rank next to `ds_train.plan.memory_estimate.model_states`
(the formulas `ds-train plan` uses) and, for bf16, the paper's own numbers. Exact tensor
accounting, not RSS: on CPU, DeepSpeed's untouched bucket allocations would not show in RSS.

    .venv/bin/python bench/bench_memory.py --precisions fp32 bf16 --stages 0 1 2 3 --world-sizes 1 2

`--grad-dtype fp32` measures bf16 runs with train.grad_dtype=fp32 (gradients accumulated and
reduced in fp32; ZeRO-2/3 only):

    .venv/bin/python bench/bench_memory.py --precisions bf16 --grad-dtype fp32 --stages 2 3 --world-sizes 1 2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ds_train.plan.memory_estimate import (  # noqa: E402
    PRECISIONS,
    BucketSizes,
    buffer_bytes,
    model_states,
    with_grad_dtype,
)
from ds_train.plan.model_shape import ModelShape  # noqa: E402
from tests.helpers import clean_env, free_port  # noqa: E402

PAPER = {  # mixed-precision Adam, bytes per parameter at N ranks
    0: lambda n: 16,
    1: lambda n: 4 + 12 / n,
    2: lambda n: 2 + 14 / n,
    3: lambda n: 16 / n,
}
MB = 1e6


def probe(cfg_path: Path, nproc: int, seq: int) -> list[dict]:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        f"--master_port={free_port()}",
        str(REPO / "bench/memory_probe.py"),
        str(cfg_path),
        str(seq),
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=clean_env(), capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"memory_probe failed:\n{proc.stderr[-4000:]}")
    line = next(x for x in proc.stdout.splitlines() if x.startswith('{"probe"'))
    return json.loads(line)["probe"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    ap.add_argument("--stages", type=int, nargs="+", default=[0, 1, 2, 3])
    ap.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument(
        "--grad-dtype", choices=["model", "fp32"], default="model", help="train.grad_dtype (bf16 runs)"
    )
    ap.add_argument("--json", help="write all measurements here")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench_memory_"))
    model = json.loads((REPO / "configs/model/tiny-llama.json").read_text())
    model.update(
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 11 // 4,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=args.hidden // 128,
    )
    (tmp / "model.json").write_text(json.dumps(model))
    rows, out = [], []
    for precision in args.precisions:
        for n in args.world_sizes:
            for stage in args.stages:
                if args.grad_dtype == "fp32" and precision == "bf16" and stage < 2:
                    print(
                        f"| bf16, fp32 grads | {n} | {stage} | refused: train.grad_dtype=fp32 needs ZeRO-2/3 |"
                    )
                    continue
                cfg = {
                    "run": {"output_dir": str(tmp / "run"), "seed": 1},
                    "model": {
                        "config": str(tmp / "model.json"),
                        "tokenizer": str(REPO / "configs/tokenizers/stdlib-bpe-4k"),
                    },
                    "data": {"train": str(REPO / "runs/demo/shards/train")},
                    # accumulation 2: the probe measures between micro-batches
                    "train": {
                        "max_steps": 1,
                        "global_batch_size": 2 * n,
                        "micro_batch_size": 1,
                        "precision": precision,
                        "grad_dtype": args.grad_dtype if precision == "bf16" else "model",
                    },
                    "zero": {"stage": stage},
                }
                path = tmp / f"{precision}_{n}_{stage}.yaml"
                path.write_text(yaml.safe_dump(cfg))
                ranks = probe(path, n, args.seq)
                r0 = ranks[0]
                psi = r0["psi"]
                formula = with_grad_dtype(PRECISIONS[precision], args.grad_dtype)
                est = model_states(psi, stage, n, formula)
                shape = ModelShape(psi, 0, 0, 0, 0, 0, 0, True, 0)
                est_buf = buffer_bytes(shape, stage, formula, BucketSizes())
                paper = PAPER[stage](n) * psi if formula.name == "bf16" else None
                worst = max(abs(r["model_states"] / est.device - 1) for r in ranks)
                out.append(
                    {
                        "precision": precision,
                        "n": n,
                        "stage": stage,
                        "ranks": ranks,
                        "estimate": est.device,
                        "paper": paper,
                        "buffers_estimate": est_buf,
                    }
                )
                rows.append(
                    f"| {formula.name} | {n} | {stage} | {r0['optimizer_class']} | {r0['params'] / MB:,.1f} | "
                    f"{r0['grads'] / MB:,.1f} | {r0['optimizer'] / MB:,.1f} | {r0['model_states'] / MB:,.1f} | "
                    f"{est.device / MB:,.1f} | {r0['model_states'] / est.device:.4f} | "
                    + (f"{paper / MB:,.1f} | " if paper else "- | ")
                    + f"{r0['buffers'] / MB:,.0f} ({est_buf / MB:,.0f}) |"
                )
                print(rows[-1], f"worst rank off by {worst:.2%}", flush=True)
    print(f"\nΨ = {psi:,} parameters; MB = 1e6 bytes, per rank (rank 0; all ranks within the worst figure)")
    print(
        "| precision | N | stage | DeepSpeed optimizer | params | grads | optimizer | model states | "
        "formula | measured / formula | paper (bf16) | buffers (est.) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
