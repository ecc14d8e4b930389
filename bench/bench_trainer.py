"""Trainer overhead: `ds-train pretrain` vs a bare deepspeed.initialize loop vs the transformers
Trainer, side by side in one invocation.

Same model, rows, global batch, micro-batch, ZeRO stage and DeepSpeed JSON (ds_train's builder)
for all; 2 ranks under torchrun. Within each repeat the systems run one after the other, in an
order rotated every repeat, so machine noise and warm caches hit all of them alike; the ratio of
median tokens/s is what counts (goals: ≥ 0.98× bare DeepSpeed, ≥ 1.05× the Trainer). Every system
is timed by the wall clock at the end of each of the steps (WARMUP, STEPS] of its own loop; a
run's tokens/s is global tokens per step over its median step time (robust to other users'
bursts on a shared machine; the mean over the window is recorded too), and the ratio is of the
medians over repeats. Two more clocks are printed for a machine shared with other work: rank 0's
CPU seconds per step (the work done, whatever else runs) and the fastest single step of all repeats
(the least disturbed one).

ds-train runs with model.document_masking=false by default, so all three attend alike (the
baselines use the plain causal mask), and with its default chunked head loss
(`model.loss_chunk_tokens`), which gets the same loss with less work than the baselines' full
logits; `--full-logits` adds ds-train computing the loss from full logits as they do, so its ratio
to bare DeepSpeed is the training loop's overhead alone. `--masking-cost` adds ds-train with its
default per-document masking, and reports its cost relative to ds-train without it.
`--noise-floor` runs the bare loop twice as two systems (an A/A test): how far apart identical
systems land on this machine, the yardstick for any ratio above.

    .venv/bin/python bench/bench_trainer.py --stages 0 2 3 --repeats 3 --masking-cost
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.helpers import clean_env, free_port  # noqa: E402

SCRIPTS = {
    "bare": "bench/bare_deepspeed_loop.py",
    "ds_train": "bench/ds_train_loop.py",
    "ds_train_masked": "bench/ds_train_loop.py",
    "hf_trainer": "bench/hf_trainer_loop.py",
    "bare_again": "bench/bare_deepspeed_loop.py",
    "ds_train_full_logits": "bench/ds_train_loop.py",
}
# Systems run only on request, each reported as a ratio to another:
# (system, the system it is divided by, ratio key, table header).
OPTIONAL_RATIOS = (
    ("ds_train_masked", "ds_train", "masked/unmasked", "masking on / off"),
    ("bare_again", "bare", "bare_again/bare", "bare / bare (A/A)"),
    ("ds_train_full_logits", "bare", "full_logits/bare", "ds-train full logits / bare"),
)


def model_config(path: Path, hidden: int, layers: int, seq_len: int = 0) -> Path:
    cfg = json.loads((REPO / "configs/model/tiny-llama.json").read_text())
    cfg.update(
        max_position_embeddings=max(cfg["max_position_embeddings"], seq_len),
        hidden_size=hidden,
        intermediate_size=hidden * 11 // 4,
        num_hidden_layers=layers,
        num_attention_heads=max(2, hidden // 64),
        num_key_value_heads=max(1, hidden // 128),
    )
    path.write_text(json.dumps(cfg))
    return path


def add_loop_args(ap: argparse.ArgumentParser, *, steps: int, seq_len: int) -> None:
    """The options of a benchmark that runs ds_train_loop.py on bench_trainer's model."""
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--steps", type=int, default=steps)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=seq_len)
    ap.add_argument("--json", help="write all measurements here")


def loop_workspace(args, prefix: str) -> tuple[Path, Path, argparse.Namespace]:
    """(temp dir, model config, run_config's options) for `add_loop_args`' arguments: the model,
    synthetic shards for the steps, and the run bench_trainer times (2 ranks, global batch 16 of
    micro 4, fp32, no loader workers)."""
    from synthetic_shards import synthetic_shards

    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    model = model_config(tmp / "model.json", args.hidden, args.layers, args.seq_len)
    synthetic_shards(tmp / "shards/train", rows=16 * (args.steps + 4), seq_len=args.seq_len)
    opts = argparse.Namespace(
        shards=str(tmp / "shards"), workers=0, steps=args.steps, global_batch=16, micro_batch=4,
        precision="fp32", warmup=args.warmup, activation_checkpointing=False,
    )  # fmt: skip
    return tmp, model, opts


def launch_loop(cfg: dict, path: Path, args) -> dict:
    """Write `cfg` to `path` and time it with ds_train_loop.py on 2 ranks (`add_loop_args`' steps)."""
    path.write_text(yaml.safe_dump(cfg))
    return launch("bench/ds_train_loop.py", path, args.steps, args.warmup, 2)


def run_config(args, model: Path, run_dir: Path, stage: int, system: str) -> dict:
    return {
        "run": {"output_dir": str(run_dir), "tensorboard": False, "seed": 1},
        "model": {
            "config": str(model),
            "tokenizer": str(REPO / "configs/tokenizers/stdlib-bpe-4k"),
            "document_masking": system == "ds_train_masked",
            # ds-train's default chunked head loss, or full logits as the baselines compute them
            **({"loss_chunk_tokens": 0} if system == "ds_train_full_logits" else {}),
            "activation_checkpointing": args.activation_checkpointing,
        },
        "data": {"train": f"{args.shards}/train", "num_workers": args.workers},
        "train": {
            "max_steps": args.steps,
            "global_batch_size": args.global_batch,
            "micro_batch_size": args.micro_batch,
            "precision": args.precision,
            "log_every": args.warmup,
            "save_every": 0,
            "save_final": False,  # the baselines save nothing either
            "eval_every": 0,
        },
        "zero": {"stage": stage},
    }


def launch(
    script: str, cfg_path: Path, steps: int, warmup: int, nproc: int, timeout_s: float | None = None
) -> dict:
    """One system's timed run: its result, or {"error"} (a failed or hung system must not take the
    others' results with it: on a lent GPU there is no second try)."""
    from gpu_bench import ERROR_LINES, TIMED_OUT, run_killable  # bench/, this script's directory

    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        f"--master_port={free_port()}",
        str(REPO / script),
        str(cfg_path),
        str(steps),
        str(warmup),
    ]
    code, stdout, stderr = run_killable(cmd, clean_env(), timeout_s)
    if code:
        why = f"killed after {timeout_s:.0f} s" if code == TIMED_OUT else f"exit {code}"
        return {"error": f"{script} {why}:\n" + "\n".join(stderr.strip().splitlines()[-ERROR_LINES:])}
    lines = [x for x in stdout.splitlines() if x.startswith('{"system"')]
    result = json.loads(lines[-1])
    # The median step filters out other users' bursts on a shared machine; the mean is kept too.
    tokens_per_step = result["tokens_per_s"] * result["step_time_s"]
    result["tokens_per_s_mean"] = result["tokens_per_s"]
    result["tokens_per_s"] = tokens_per_step / statistics.median(result["step_times"])
    result["tokens_per_cpu_s"] = tokens_per_step / statistics.median(result["cpu_step_times"])
    # The fastest step: the one the other users disturbed least (timeit's minimum).
    result["tokens_per_s_best"] = tokens_per_step / min(result["step_times"])
    return result


def summarise(runs: dict[str, list[dict]], systems: list[str]) -> dict:
    """Ratios of medians over repeats, by wall clock and by rank 0's CPU time per step, and of the
    fastest wall-clock step of all repeats ("best"). Failed runs are left out; a ratio whose
    systems have no successful run is left out too."""
    out: dict = {"runs": runs}
    ok = {s: [x for x in runs[s] if "error" not in x] for s in systems}
    present = [s for s in systems if ok[s]]
    pairs = [("ds_train", "bare", "ds_train/bare"), ("ds_train", "hf_trainer", "ds_train/hf_trainer")]
    pairs += [(system, reference, ratio) for system, reference, ratio, _ in OPTIONAL_RATIOS]
    for clock, key, agg in (
        ("wall", "tokens_per_s", statistics.median),
        ("cpu", "tokens_per_cpu_s", statistics.median),
        ("best", "tokens_per_s_best", max),
    ):
        med = {s: agg(x[key] for x in ok[s]) for s in present}
        out[clock] = {ratio: med[a] / med[b] for a, b, ratio in pairs if a in med and b in med}
        out[f"median_{key}"] = med
    # Runs next to each other in time share the machine's load best: their ratio, per repeat.
    out["paired_wall"] = [
        round(d["tokens_per_s"] / b["tokens_per_s"], 3)
        for d, b in zip(runs["ds_train"], runs["bare"])
        if "error" not in d and "error" not in b
    ]
    if ok["ds_train"]:
        out["metrics_jsonl_tokens_per_s"] = statistics.median(
            x["metrics_tokens_per_s"] for x in ok["ds_train"]
        )
    out["failed"] = {
        s: [x["error"] for x in runs[s] if "error" in x] for s in systems if len(ok[s]) < len(runs[s])
    }
    return out


def table(results: dict, systems: list[str]) -> str:
    extra = [(ratio, header) for system, _, ratio, header in OPTIONAL_RATIOS if system in systems]
    head = "| ZeRO | clock | bare DS tok/s | ds-train tok/s | HF Trainer tok/s | ds-train / bare | ds-train / Trainer |"
    lines = [head + "".join(f" {h} |" for _, h in extra), "|---" * (7 + len(extra)) + "|"]

    def tps(m: dict, system: str, unit: str = "") -> str:
        return f"{m[system]:,.0f}{unit}" if system in m else "failed"

    def ratio(q: dict, key: str) -> str:
        return f"{q[key]:.3f}" if key in q else "-"

    for stage, res in results["stages"].items():
        for clock, key, unit in (
            ("wall", "tokens_per_s", ""),
            ("cpu", "tokens_per_cpu_s", " per CPU-s"),
            ("best", "tokens_per_s_best", " (best step)"),
        ):
            m, q = res[f"median_{key}"], res[clock]
            row = (
                f"| {stage} | {clock} | {tps(m, 'bare', unit)} | {tps(m, 'ds_train')} | {tps(m, 'hf_trainer')} | "
                f"{ratio(q, 'ds_train/bare')} | {ratio(q, 'ds_train/hf_trainer')} |"
            )
            lines.append(row + "".join(f" {ratio(q, k)} |" for k, _ in extra))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stages", type=int, nargs="+", default=[0, 2, 3])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps (also ds-train's log interval)")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--global-batch", type=int, default=16)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--activation-checkpointing", action="store_true")
    ap.add_argument(
        "--workers",
        type=int,
        default=0,
        help="data.num_workers; 0 on CPU, where a worker process would compete with the ranks for the cores",
    )
    ap.add_argument("--masking-cost", action="store_true", help="also run ds-train with document masking")
    ap.add_argument(
        "--noise-floor",
        action="store_true",
        help="also run the bare loop a second time as its own system (an A/A test): the ratio of two "
        "identical systems is how far apart this machine's noise alone puts them",
    )
    ap.add_argument(
        "--full-logits",
        action="store_true",
        help="also run ds-train with model.loss_chunk_tokens=0: the loss from full logits, the "
        "baselines' arithmetic, so its ratio to bare DeepSpeed is the loop's overhead alone",
    )
    ap.add_argument("--shards", default=str(REPO / "runs/demo/shards"), help="shard dir with train/")
    ap.add_argument(
        "--synthetic-seq-len",
        type=int,
        help="train on synthetic shards of this sequence length instead of --shards (random tokens of "
        "the repo's tokenizer, written to the temporary directory): for a machine without the demo's "
        "shards, such as the GPU box (bench/gpu.sh MODE=anchors)",
    )
    ap.add_argument("--json", help="write all measurements here (after every run)")
    ap.add_argument(
        "--run-timeout-s",
        type=float,
        help="kill a system's run (and its ranks) after this long: recorded as failed",
    )
    args = ap.parse_args()
    if args.steps % args.warmup:
        ap.error("--steps must be a multiple of --warmup (ds-train logs every --warmup steps)")
    tmp = Path(tempfile.mkdtemp(prefix="bench_trainer_"))
    model = model_config(tmp / "model.json", args.hidden, args.layers, args.synthetic_seq_len or 0)
    if args.synthetic_seq_len:
        from synthetic_shards import synthetic_shards  # bench/, this script's directory, is on sys.path

        rows = args.global_batch * (args.steps + 4)
        synthetic_shards(tmp / "shards/train", rows=rows, seq_len=args.synthetic_seq_len)
        args.shards = str(tmp / "shards")
    systems = ["bare", "ds_train", "hf_trainer"] + (["ds_train_masked"] if args.masking_cost else [])
    systems += ["bare_again"] if args.noise_floor else []
    systems += ["ds_train_full_logits"] if args.full_logits else []
    results: dict = {"args": vars(args), "stages": {}, "loadavg_start": os.getloadavg()}
    for stage in args.stages:
        runs: dict[str, list[dict]] = {s: [] for s in systems}
        for r in range(args.repeats):
            order = systems[r % len(systems) :] + systems[: r % len(systems)]
            for system in order:
                run_dir = tmp / f"s{stage}_r{r}_{system}"
                cfg = run_config(args, model, run_dir, stage, system)
                cfg_path = tmp / f"s{stage}_r{r}_{system}.yaml"
                cfg_path.write_text(yaml.safe_dump(cfg))
                result = launch(
                    SCRIPTS[system], cfg_path, args.steps, args.warmup, args.nproc, args.run_timeout_s
                )
                runs[system].append(result)
                shutil.rmtree(run_dir, ignore_errors=True)
                if "error" in result:
                    print(f"ZeRO-{stage} repeat {r}: {system} FAILED: {result['error']}", flush=True)
                results["stages"][stage] = summarise(runs, systems)
                # after every run: a call cut short (a lent GPU's time limit) keeps the ones done
                if args.json:
                    Path(args.json).write_text(json.dumps(results, indent=1))
            line = ", ".join(
                f"{s} {x['tokens_per_s']:,.0f} ({x['tokens_per_cpu_s']:,.0f}/CPU-s)"
                for s in systems
                if "error" not in (x := runs[s][-1])
            )
            print(f"ZeRO-{stage} repeat {r}: {line} tok/s", flush=True)
        res = results["stages"][stage]
        print(
            f"ZeRO-{stage}: wall ratios "
            + ", ".join(f"{k} {v:.3f}" for k, v in res["wall"].items())
            + " | CPU-time ratios "
            + ", ".join(f"{k} {v:.3f}" for k, v in res["cpu"].items())
            + " | best-step ratios "
            + ", ".join(f"{k} {v:.3f}" for k, v in res["best"].items())
            + f" | paired ds_train/bare per repeat {res['paired_wall']}",
            flush=True,
        )
    results["loadavg_end"] = os.getloadavg()
    print(f"\nload average at start {results['loadavg_start']}, at end {results['loadavg_end']} (2 cores)")
    print(table(results, systems))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
