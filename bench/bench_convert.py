"""Conversion: `ds-train convert to-hf` vs DeepSpeed's `zero_to_fp32.py --safe_serialization`.

One ~338 M-parameter Llama ZeRO-3 checkpoint from 2 ranks (bench/make_zero3_checkpoint.py), then
each converter runs as its own process, alternating, REPEATS times; wall time and the child's peak
RSS (`wait4`'s ru_maxrss, so exactly that process) are recorded and the medians compared (goals:
≤ 1.0× the wall time, ≤ 0.3× the peak RSS). The outputs are compared tensor by tensor (bitwise).

    .venv/bin/python bench/bench_convert.py --repeats 3 [--workdir /tmp/bench-convert]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.helpers import clean_env, free_port  # noqa: E402


def run_measured(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS in GB) of one child process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    err = proc.stderr.read().decode(errors="replace")
    proc.stderr.close()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-3000:]}")
    return wall, usage.ru_maxrss / 1e6  # ru_maxrss is in KiB on Linux


def make_checkpoint(ckpt: Path) -> None:
    if (ckpt / "latest").is_file():
        return
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={free_port()}",
        "bench/make_zero3_checkpoint.py",
        str(ckpt),
    ]
    subprocess.run(cmd, cwd=REPO, env=clean_env(), check=True)


def same_tensors(a: Path, b: Path) -> int:
    import torch
    from safetensors.torch import load_file

    def load(d: Path) -> dict:
        out = {}
        for f in sorted(d.glob("*.safetensors")):
            out.update(load_file(str(f)))
        return out

    ta, tb = load(a), load(b)
    if set(ta) != set(tb):
        raise SystemExit(f"different tensor names: {sorted(set(ta) ^ set(tb))[:5]}")
    bad = [k for k in ta if not torch.equal(ta[k], tb[k])]
    if bad:
        raise SystemExit(f"{len(bad)} tensors differ, e.g. {bad[0]}")
    return len(ta)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workdir", default="/tmp/bench-convert")
    ap.add_argument("--max-shard-size", default="2GB")
    args = ap.parse_args()
    work = Path(args.workdir)
    ckpt = work / "ckpt"
    make_checkpoint(ckpt)
    size = sum(f.stat().st_size for f in (ckpt / "global_step1").glob("*.pt")) / 1e9
    systems = {
        "ds_train": [
            sys.executable, "-m", "ds_train", "convert", "to-hf", str(ckpt), str(work / "ours"),
            "--model-config", str(ckpt / "config.json"), "--max-shard-size", args.max_shard_size, "--force",
        ],
        "zero_to_fp32": [
            sys.executable, "-m", "deepspeed.utils.zero_to_fp32", str(ckpt), str(work / "theirs"),
            "--safe_serialization", "--max_shard_size", args.max_shard_size,
        ],
    }  # fmt: skip
    results: dict[str, list[tuple[float, float]]] = {k: [] for k in systems}
    for r in range(args.repeats):
        order = list(systems) if r % 2 == 0 else list(reversed(systems))
        for name in order:
            results[name].append(run_measured(systems[name]))
            print(json.dumps({"repeat": r, "system": name, "wall_s": results[name][-1][0],
                              "peak_rss_gb": results[name][-1][1]}), flush=True)  # fmt: skip
    n = same_tensors(work / "ours", work / "theirs")
    med = {
        k: (statistics.median(w for w, _ in v), statistics.median(m for _, m in v))
        for k, v in results.items()
    }
    ours, theirs = med["ds_train"], med["zero_to_fp32"]
    print()
    print(f"checkpoint: {size:.2f} GB of rank files (2 ranks, ZeRO-3); {n} tensors, bitwise equal")
    print(f"{'system':<14}{'wall s (median)':>18}{'peak RSS GB':>14}")
    for name, (w, m) in med.items():
        print(f"{name:<14}{w:>18.2f}{m:>14.2f}")
    print(f"ratio ds_train / zero_to_fp32: wall {ours[0] / theirs[0]:.2f}x (goal <= 1.0), "
          f"peak RSS {ours[1] / theirs[1]:.2f}x (goal <= 0.3)")  # fmt: skip


if __name__ == "__main__":
    main()
