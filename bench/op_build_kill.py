"""A 2-rank run killed while DeepSpeed compiles its CPU Adam op, then run again (docs/reliability.md):
how long until the build started, what the re-run says and how long it takes. Then what the guard
costs when the op is already built: loading it through `guarded_load` vs DeepSpeed's own load, each
in a fresh process (imports not timed).

    python bench/op_build_kill.py [--repeats 5]

It uses an empty extensions directory of its own, so the op really is built."""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

sys.path.insert(0, str(REPO / "bench"))
from synthetic_shards import TOKENIZER, synthetic_shards  # noqa: E402

from tests.helpers import clean_env, kill_job, torchrun_command  # noqa: E402

LOAD = """
import time, sys
from deepspeed.ops.op_builder import CPUAdamBuilder
from ds_train.distributed.op_builds import guarded_load
b = CPUAdamBuilder()
t0 = time.perf_counter()
if sys.argv[1] == "guarded":
    guarded_load(b.name, b.load)
else:
    b.load()
print(time.perf_counter() - t0)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5, help="fresh-process loads of the built op, per way")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="op_build_kill_"))
    env = clean_env({"TORCH_EXTENSIONS_DIR": str(tmp / "ext"), "DS_ACCELERATOR": "cpu"})
    synthetic_shards(tmp / "shards/train", rows=64, seq_len=32)
    cfg = tmp / "run.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "run": {"output_dir": str(tmp / "run"), "tensorboard": False},
                "model": {"config": str(REPO / "configs/model/tiny-llama.json"), "tokenizer": str(TOKENIZER)},
                "data": {"train": str(tmp / "shards/train"), "num_workers": 0},
                "train": {"max_steps": 3, "global_batch_size": 8, "micro_batch_size": 2, "precision": "fp32"},
                "zero": {"preset": "stage2-offload-optimizer"},
            }
        )
    )

    def cmd() -> list[str]:
        return torchrun_command("ds_train", ["pretrain", cfg])

    t0 = time.monotonic()
    first = subprocess.Popen(
        cmd(), cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    lock = tmp / "ext" / "cpu_adam" / "lock"
    while not lock.exists():
        time.sleep(0.1)
    print(f"build lock appeared {time.monotonic() - t0:.1f} s after the start; SIGKILL to the whole job")
    kill_job(first)
    print(f"stale lock left: {lock.exists()}")
    t1 = time.monotonic()
    rerun = subprocess.run(cmd(), cwd=REPO, env=env, capture_output=True, text=True)
    print(f"re-run: exit {rerun.returncode} after {time.monotonic() - t1:.1f} s")
    for line in rerun.stderr.splitlines():
        if re.search(r"op_builds|step 3/3", line):
            print("   ", line)

    for way in ("deepspeed", "guarded"):
        times = [
            float(
                subprocess.run(
                    [sys.executable, "-c", LOAD, way],
                    cwd=REPO,
                    env=env,
                    capture_output=True,
                    text=True,
                    check=True,
                ).stdout.split()[-1]
            )
            for _ in range(args.repeats)
        ]
        print(
            f"built op loaded by {way}: median {statistics.median(times) * 1e3:.0f} ms over {args.repeats} processes"
        )


if __name__ == "__main__":
    main()
