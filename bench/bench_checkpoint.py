"""Checkpoint save and resume: ds-train's CheckpointManager vs DeepSpeed's own save/load.

A save blocks training (and, on Slurm, has to fit between the preemption warning and the kill:
`--signal=USR1@120`), so its cost over a bare `engine.save_checkpoint` is what ds-train's
integrity guarantees (every file's sha256 in a manifest, atomic completion, refusal to load a
damaged checkpoint) charge per save and per resume. bench/checkpoint_probe.py builds one engine
(2 ranks, ds-train's DeepSpeed JSON, one optimizer step so Adam's moments exist) and alternates
the two writers and readers on it; this prints medians, their ratio and the write rate.

    .venv/bin/python bench/bench_checkpoint.py --stages 2 3 --repeats 4
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.helpers import clean_env, free_port  # noqa: E402


def probe(
    args, tmp: Path, stage: int, script: str = "checkpoint_probe.py", extra: tuple[str, ...] = ()
) -> dict:
    """Run `script` (a probe in bench/) on `args.nproc` ranks over a model of `args.hidden` ×
    `args.layers` at ZeRO `stage`; its JSON line's "probe" object."""
    model = json.loads((REPO / "configs/model/tiny-llama.json").read_text())
    model.update(
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 3,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=args.hidden // 64,
    )
    (tmp / "model.json").write_text(json.dumps(model))
    cfg = {
        "run": {"output_dir": str(tmp / "run"), "seed": 1},
        "model": {
            "config": str(tmp / "model.json"),
            "tokenizer": str(REPO / "configs/tokenizers/stdlib-bpe-4k"),
        },
        "data": {"train": str(tmp / "unused")},  # the probe reads no data
        "train": {
            "max_steps": 1,
            "global_batch_size": args.nproc,
            "micro_batch_size": 1,
            "precision": args.precision,
        },
        "zero": {"stage": stage},
    }
    cfg_path = tmp / f"stage{stage}.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    out = Path(args.dir or tmp) / f"bench_checkpoint_{os.getpid()}_stage{stage}"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={args.nproc}",
        f"--master_port={free_port()}",
        str(REPO / "bench" / script),
        str(cfg_path),
        str(args.repeats),
        str(out),
        *extra,
        *(["--drop-caches"] if getattr(args, "drop_caches", False) else []),
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=clean_env(), capture_output=True, text=True)
    shutil.rmtree(out, ignore_errors=True)
    if proc.returncode:
        raise SystemExit(f"{script} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    line = next(x for x in proc.stdout.splitlines() if x.startswith('{"probe"'))
    return json.loads(line)["probe"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stages", type=int, nargs="+", default=[2, 3])
    ap.add_argument("--repeats", type=int, default=4, help="even: each system goes first as often")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--precision", default="fp32")
    ap.add_argument(
        "--dir",
        help="where the checkpoints go (default: a temporary directory; /dev/shm takes the disk out "
        "and leaves the CPU work each system does per byte)",
    )
    ap.add_argument("--drop-caches", action="store_true", help="empty the page cache before each load (root)")
    ap.add_argument("--json", help="write the probes' measurements here")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench_checkpoint_"))
    rows, results = [], []
    for stage in args.stages:
        p = probe(args, tmp, stage)
        results.append({"stage": stage, **p})
        med = {k: statistics.median(v) for k, v in p["times"].items()}
        gb = p["bytes"]["bare"] / 1e9
        rows.append(
            f"| {stage} | {p['psi'] / 1e6:,.0f} M | {gb:.2f} GB | {med['bare_save']:.2f} | {med['ds_save']:.2f} | "
            f"**{med['ds_save'] / med['bare_save']:.2f}×** | {med['bare_load']:.2f} | {med['ds_load']:.2f} | "
            f"**{med['ds_load'] / med['bare_load']:.2f}×** | {gb / med['ds_save']:.2f} GB/s |"
        )
        per_repeat = ", ".join(f"{d / b:.2f}" for d, b in zip(p["times"]["ds_save"], p["times"]["bare_save"]))
        print(rows[-1], f"(ds/bare save per repeat: {per_repeat})", flush=True)
    shutil.rmtree(tmp, ignore_errors=True)
    print(
        f"\n{args.nproc} ranks, {args.precision}, medians of {args.repeats} (seconds, barrier to barrier), "
        f"checkpoints in {args.dir or tempfile.gettempdir()}"
        + (", page cache dropped before each load" if args.drop_caches else ", warm page cache")
    )
    print(
        "| ZeRO | params | checkpoint | bare save s | ds-train save s | save ratio | bare load s | "
        "ds-train verify + load s | load ratio | ds-train write rate |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
