"""Trainer overhead: `ds-train pretrain` vs a bare deepspeed.initialize loop, side by side.

Same model, global batch, micro-batch, ZeRO stage and DeepSpeed JSON; 2 ranks; runs alternate
(bare, ours, bare, ours, ...) so machine noise hits both alike; the ratio of median tokens/s is
what counts (goal ≥ 0.98). ds-train's figure comes from its own metrics.jsonl, excluding the first
log interval (start-up, compile of DeepSpeed ops, first data fetch).

    .venv/bin/python bench/bench_trainer.py --stages 0 2 3 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.helpers import clean_env, free_port  # noqa: E402


def model_config(path: Path, hidden: int, layers: int) -> Path:
    cfg = json.loads((REPO / "configs/model/tiny-llama.json").read_text())
    cfg.update(hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=layers,
               num_attention_heads=max(2, hidden // 64), num_key_value_heads=max(1, hidden // 128))
    path.write_text(json.dumps(cfg))
    return path


def torchrun(args: list[str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}", *args]
    proc = subprocess.run(cmd, cwd=REPO, env=clean_env(), capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(proc.stderr[-4000:])
    return proc


def run_ours(cfg_path: Path, run_dir: Path, warmup_logs: int) -> float:
    torchrun(["-m", "ds_train", "pretrain", str(cfg_path)])
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r][warmup_logs:]
    tokens_per_step = train[0]["tokens_per_s"] * train[0]["step_time_s"]  # global batch × seq_len
    return tokens_per_step / statistics.mean(r["step_time_s"] for r in train)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stages", type=int, nargs="+", default=[0, 2, 3])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--workers", type=int, default=0, help="data.num_workers (CPU ranks share 2 cores with workers)")
    ap.add_argument("--document-masking", action="store_true", help="ds-train with per-document attention masks "
                    "(more work than the bare loop's plain causal mask)")
    ap.add_argument("--shards", default=str(REPO / "runs/demo/shards"), help="shard dir with train/ (seq_len 128)")
    args = ap.parse_args()
    warmup = 5
    tmp = Path(tempfile.mkdtemp(prefix="bench_trainer_"))
    model = model_config(tmp / "model.json", args.hidden, args.layers)
    results = {}
    for stage in args.stages:
        ours, bare = [], []
        for r in range(args.repeats):
            run_dir = tmp / f"s{stage}_r{r}"
            cfg = {"run": {"output_dir": str(run_dir), "tensorboard": False, "seed": 1},
                   "model": {"config": str(model), "tokenizer": str(REPO / "configs/tokenizers/stdlib-bpe-4k"),
                             "document_masking": args.document_masking},
                   "data": {"train": f"{args.shards}/train", "num_workers": args.workers},
                   "train": {"max_steps": args.steps, "global_batch_size": 16, "micro_batch_size": 4,
                             "precision": "fp32", "log_every": warmup, "save_every": 0, "eval_every": 0},
                   "zero": {"stage": stage}}
            cfg_path = tmp / f"s{stage}_r{r}.yaml"
            cfg_path.write_text(yaml.safe_dump(cfg))
            out = torchrun([str(REPO / "bench/bare_deepspeed_loop.py"), str(cfg_path), str(args.steps), str(warmup)])
            bare.append(json.loads(out.stdout.strip().splitlines()[-1])["tokens_per_s"])
            ours.append(run_ours(cfg_path, run_dir, warmup_logs=1))
            print(f"stage {stage} repeat {r}: bare {bare[-1]:,.0f} tok/s, ds-train {ours[-1]:,.0f} tok/s", flush=True)
        ratio = statistics.median(ours) / statistics.median(bare)
        results[stage] = ratio
        print(f"ZeRO-{stage}: ds-train / bare DeepSpeed = {ratio:.3f} "
              f"(median {statistics.median(ours):,.0f} vs {statistics.median(bare):,.0f} tok/s)", flush=True)
    print(json.dumps({"ratios": results}))


if __name__ == "__main__":
    main()
