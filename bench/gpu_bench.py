"""One-GPU throughput and MFU of `ds-train pretrain` on a ~1B Llama, and what each knob is worth.

Self-contained and offline: synthetic shards (random tokens of the repo's tokenizer, documents of
geometric length ~1,000 tokens separated by EOS) are written locally, the model is
configs/model/llama-1b.json with its vocabulary padded to 32,768 (a Llama-2-sized embedding and
LM head; the repo's tokenizer has 4,096 tokens), bf16, sequence length 2048, ZeRO-2. Every variant
changes one thing from the baseline and runs as its own process (fresh CUDA context); tokens/s is
the wall clock over the steps after warm-up, MFU = FLOPs/token × tokens/s / 989 TFLOP/s (PaLM
FLOPs per token, attention term not halved: ds_train/model/flops.py). At the end, the knobs that
beat the baseline by more than 1% without changing what is trained (document masking off does)
are combined into a "tuned" run, whose config overrides are printed: every tunable variant is a
`ds-train pretrain` option, so the tuned run is one a user can reproduce.

The baseline, candidate and tuned runs also record a torch.profiler trace of one step inside their
untimed warm-up (step WARMUP-1; `profile.*` of the run config; the timed steps after it were seen
unaffected): its summary (GPU busy share, kernel time by kind: ds_train/train/trace_summary.py) and
op table go into the results, and the trace is copied to --profile-dir, so a run short of its MFU
goal says where the time went. Only those three: exporting a 1B step's trace costs tens of seconds
of a lease. Each run's directory is removed after it (no checkpoint is written: train.save_final
is off), and every run is killed with its ranks past --run-timeout-s or the budget's end.

    bench/gpu.sh                       # all variants (≈ 2 min each on an H100)
    VARIANTS="baseline no_doc_mask compile" bench/gpu.sh
    GPU_BENCH_TOY=1 bench/gpu.sh       # CPU smoke test: tiny model, seq 128, fp32
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gpu_variants import Variant, tuned_choice, variants  # noqa: E402  (bench/ is on sys.path)
from synthetic_shards import TOKENIZER, synthetic_shards  # noqa: E402

from ds_train.train.trace_summary import describe as describe_profile  # noqa: E402
from tests.helpers import clean_env, free_port  # noqa: E402

H100_BF16_PEAK = 989e12
TRACE_COPY_LIMIT = 15 * 2**20  # bytes; a lent GPU machine returns files of up to 16 MiB


def base_config(args, tmp: Path, shards: Path) -> dict:
    toy = args.toy
    return {
        "run": {"output_dir": str(tmp / "run"), "seed": 1, "tensorboard": False},
        "model": {
            "config": str(REPO / ("configs/model/tiny-llama.json" if toy else "configs/model/llama-1b.json")),
            "tokenizer": str(TOKENIZER),
            "pad_vocab_multiple": 128 if toy else 32768,
        },
        "data": {"train": str(shards), "num_workers": 0 if toy else 2},
        "train": {
            "max_steps": args.steps,
            "global_batch_size": args.global_batch,
            "micro_batch_size": args.micro,
            "precision": "fp32" if toy else "bf16",
            "log_every": args.warmup,
            "save_every": 0,
            "save_final": False,  # a 1B run's checkpoint is ~15 GB: a few fill a lent machine's disk
            "eval_every": 0,
            "warmup_steps": 2,
            # MFU against the H100/H200 dense bf16 peak in toy mode too: the arithmetic runs end to
            # end and prints a (tiny) figure; it says nothing about a CPU.
            "peak_flops": H100_BF16_PEAK,
        },
        "zero": {"stage": 2},
    }


def run_variant(
    args,
    cfg_path: Path,
    v: Variant,
    extra: list[str],
    run_dir: Path,
    inductor_cache: Path | None = None,
    timeout_s: float | None = None,
) -> dict:
    """One `ds-train pretrain` run through bench/ds_train_loop.py: its result line, or {"error"}.
    Its inductor cache is `inductor_cache`, by default one of its own in `run_dir`. A run past
    `timeout_s` (a hang in a compile or a collective would spend a lent machine's whole call) is
    killed with its process group: torchrun's ranks too, which would keep the GPU."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", f"--master_port={free_port()}",
           str(REPO / "bench/ds_train_loop.py"), str(cfg_path), str(args.steps), str(args.warmup),
           *(["--compile"] if v.compile else []), f"run.output_dir={run_dir}", *extra]  # fmt: skip
    # each run its own inductor cache: every compiled run's first step is a cold compile (the
    # tuned run's would otherwise reuse the compile variant's kernels and look cheap to start)
    env = clean_env({"TORCHINDUCTOR_CACHE_DIR": str(inductor_cache or run_dir / "inductor_cache")})
    code, stdout, stderr = run_killable(cmd, env, timeout_s)
    if code:
        tail = "\n".join(stderr.strip().splitlines()[-ERROR_LINES:])
        why = f"killed after {timeout_s:.0f} s" if code == TIMED_OUT else f"exit {code}"
        return {"error": f"{why}: {tail}"}
    return json.loads(next(x for x in reversed(stdout.splitlines()) if x.startswith('{"system"')))


ERROR_LINES = 40  # of a failed run's stderr, kept in the results (the call's own output is short)
TIMED_OUT = -9


def run_killable(cmd: list[str], env: dict, timeout_s: float | None) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `cmd` in a session of its own; past `timeout_s`, the whole
    process group is killed and the code is TIMED_OUT."""
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout_s)
        return proc.returncode, out, err
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        return TIMED_OUT, out, err


def profile_overrides(warmup: int) -> list[str]:
    """Record step WARMUP-1, the profiler warming up in the step before: both inside the untimed
    warm-up, and the trace is written before the clock starts at the end of step WARMUP."""
    return [f"profile.start_step={warmup - 1}", "profile.steps=1", "profile.warmup_steps=1"]


def collect_profile(run_dir: Path, warmup: int, name: str, into: Path | None) -> dict | None:
    """Rank 0's profile of a run: summary and op table for the results, the trace copied `into`."""
    window = run_dir / "profile" / f"steps_{warmup - 1}-{warmup - 1}"
    found = {}
    for key, file in (("summary", "rank0.summary.json"), ("ops_table", "rank0.ops.txt")):
        if (window / file).is_file():
            text = (window / file).read_text()
            found[key] = json.loads(text) if file.endswith(".json") else text
    trace = window / "rank0.pt.trace.json.gz"
    if into is not None and trace.is_file():
        if trace.stat().st_size <= TRACE_COPY_LIMIT:
            into.mkdir(parents=True, exist_ok=True)
            found["trace"] = str(shutil.copy(trace, into / f"{name}.pt.trace.json.gz"))
        else:
            found["trace"] = f"{trace} ({trace.stat().st_size / 2**20:.0f} MiB: too big to copy)"
    return found or None


def describe(r: dict, base: dict | None) -> str:
    if "error" in r:
        return f"FAILED ({r['error'].splitlines()[-1][:120]})"
    mfu = "  n/a"
    if r.get("mfu") is not None:
        pct = 100 * r["mfu"]
        tflops = r["mfu"] * H100_BF16_PEAK / 1e12
        mfu = f"{pct:5.1f}%" if pct >= 0.1 else f"{pct:.1e}%"
        mfu += f" ({tflops:.3g} TFLOP/s)"
    delta = (
        f"{r['tokens_per_s'] / base['tokens_per_s'] - 1:+6.1%}" if base and "error" not in base else "     -"
    )
    mem = f"{r['peak_allocated_gib']:6.1f} GiB" if "peak_allocated_gib" in r else "     -"
    if r.get("alloc_retries"):  # the allocator thrashed: the variant's speed is not its own
        mem += f" ({r['alloc_retries']} alloc retries)"
    first = f"{r['first_step_s']:5.1f} s" if "first_step_s" in r else "    -"
    wait = f"{100 * r['data_wait_frac']:4.1f}%" if "data_wait_frac" in r else "   -"
    return f"{r['tokens_per_s']:>12,.0f} tok/s  MFU {mfu}  {delta}  peak {mem}  1st step {first}  data wait {wait}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--toy", action="store_true", help="CPU smoke test (tiny model, seq 128, fp32)")
    ap.add_argument("--variants", nargs="*", help="names to run (default: all; baseline always runs)")
    ap.add_argument("--seq-len", type=int)
    ap.add_argument("--micro", type=int)
    ap.add_argument("--global-batch", type=int)
    ap.add_argument("--steps", type=int)
    ap.add_argument("--warmup", type=int)
    ap.add_argument("--no-tuned", action="store_true", help="skip the combined 'tuned' run")
    ap.add_argument(
        "--no-profile",
        action="store_true",
        help="no profiler trace of the baseline, candidate and tuned runs",
    )
    ap.add_argument("--profile-dir", help="copy the baseline's, candidate's and tuned run's traces here")
    ap.add_argument("--json", help="write all results here")
    ap.add_argument("--workdir", help="shards and runs (default: a temporary directory)")
    ap.add_argument(
        "--budget-s",
        type=float,
        help="wall-clock budget: a variant (or the tuned run) is skipped when the longest run so far "
        "would not fit in what is left; for a lent GPU with a fixed allowance. Results are written "
        "after every run, so a run cut short still leaves the ones before it; a run is also killed "
        "when it outlasts what is left (plus --grace-s)",
    )
    ap.add_argument("--grace-s", type=float, default=30.0, help="a run may outlast --budget-s by this much")
    ap.add_argument(
        "--run-timeout-s", type=float, default=420.0, help="kill a run (and its ranks) after this long"
    )
    ap.add_argument("--keep-runs", action="store_true", help="keep each run's directory (default: removed)")
    args = ap.parse_args()
    toy = args.toy
    args.seq_len = args.seq_len or (128 if toy else 2048)
    args.micro = args.micro or (2 if toy else 4)
    args.global_batch = args.global_batch or (8 if toy else 64)
    args.steps = args.steps or (12 if toy else 20)
    args.warmup = args.warmup or (4 if toy else 5)
    if args.steps % args.warmup:
        ap.error("--steps must be a multiple of --warmup (the log interval)")
    # the recorded step (WARMUP-1) and the profiler's warm-up before it both after step 1 (start-up)
    profiling = not args.no_profile and args.warmup >= 4
    # Profiled (and their traces copied): exporting a 1B step's trace costs tens of seconds of a
    # lease, and a lent GPU machine returns at most 8 files.
    profiled = {"baseline", "candidate", "tuned"}

    tmp = Path(args.workdir or tempfile.mkdtemp(prefix="gpu_bench_"))
    tmp.mkdir(parents=True, exist_ok=True)
    rows = max(4 * args.global_batch, args.global_batch * args.steps // 4)
    shards = synthetic_shards(tmp / f"shards_{args.seq_len}", rows=rows, seq_len=args.seq_len)
    cfg_path = tmp / "base.yaml"
    cfg_path.write_text(yaml.safe_dump(base_config(args, tmp, shards)))

    model_config = json.loads(Path(base_config(args, tmp, shards)["model"]["config"]).read_text())
    all_variants = variants(args.micro, model_config["num_hidden_layers"], args.warmup)
    wanted = set(args.variants or [v.name for v in all_variants]) | {"baseline"}
    if toy and not args.variants:
        wanted = {"baseline", "no_doc_mask", "zero1", f"micro_{args.micro * 2}", "act_ckpt", "act_ckpt_half"}
    print(f"device: {_device()} | seq_len {args.seq_len}, global batch {args.global_batch}, "
          f"{args.steps} steps ({args.warmup} warm-up) | work dir {tmp}", flush=True)  # fmt: skip
    results: dict[str, dict] = {}
    clock = Budget(args.budget_s)

    def save() -> None:
        if args.json:
            Path(args.json).write_text(
                json.dumps({"args": vars(args), "device": _device(), "results": results}, indent=1)
            )

    def run_profiled(v: Variant, overrides: list[str]) -> dict:
        run_dir = tmp / f"run_{v.name}"
        profile = profiling and v.name in profiled
        extra = overrides + (profile_overrides(args.warmup) if profile else [])
        r = run_variant(
            args, cfg_path, v, extra, run_dir, timeout_s=clock.run_limit(args.run_timeout_s, args.grace_s)
        )
        if profile and "error" not in r:
            into = Path(args.profile_dir) if args.profile_dir else None
            r["profile"] = collect_profile(run_dir, args.warmup, v.name, into)
        if not args.keep_runs:  # its metrics are in the result; its inductor cache is its own
            shutil.rmtree(run_dir, ignore_errors=True)
        return r

    def show_profile(name: str, r: dict) -> None:
        if "summary" in (r.get("profile") or {}):
            print(f"{'':<20} profile of {describe_profile(r['profile']['summary'])}", flush=True)

    def skip(name: str, why: str) -> None:
        results[name] = {"skipped": why}
        print(f"{name:<20} skipped: {why}", flush=True)

    for v in all_variants:
        if v.name not in wanted:
            continue
        if not clock.fits():
            skip(v.name, "over --budget-s")
            continue
        if v.needs == "cuda" and not _has_cuda():
            skip(v.name, "needs a CUDA GPU")
            continue
        if v.needs not in (None, "cuda") and not _importable(v.needs):
            skip(v.name, f"{v.needs} is not installed")
            continue
        # a compiling run is longer by its compile: it does not stand for the variants after it
        with clock.timing(typical=not v.compiles):
            r = run_profiled(v, v.overrides)
        results[v.name] = {
            **r,
            "what": v.what,
            "knob": v.knob,
            "overrides": v.overrides,
            "compile": v.compile,
        }
        base = results["baseline"] if v.name != "baseline" else None
        print(f"{v.name:<20} {describe(r, base)}   {v.what}", flush=True)
        show_profile(v.name, r)
        save()

    base = results["baseline"]
    if not args.no_tuned and "error" not in base:
        best = tuned_choice(all_variants, results)
        if best and not clock.fits():
            skip("tuned", "over --budget-s")
        elif best:
            chosen = list(best.values())
            overrides = [o for v in chosen for o in v.overrides]
            # tunable variants are config overrides only (engine.compile() is never tuned in)
            tuned = Variant("tuned", "-", " + ".join(v.name for v in chosen), overrides)
            r = run_profiled(tuned, overrides)
            results["tuned"] = {**r, "what": tuned.what, "overrides": overrides}
            print(f"{'tuned':<20} {describe(r, base)}   {tuned.what}", flush=True)
            print(f"{'':<20} as a run: ds-train pretrain RUN.yaml {' '.join(map(shlex.quote, overrides))}")
            show_profile("tuned", r)
    if not args.workdir and not args.keep_runs:
        shutil.rmtree(tmp, ignore_errors=True)
    note = " (toy run on CPU: the MFU only shows the arithmetic runs)" if toy else ""
    print(
        f"MFU against 989 TFLOP/s dense bf16 per GPU{note}; deltas are tokens/s vs baseline in this invocation"
    )
    save()


class Budget:
    """Whether one more run fits in a wall-clock allowance, judged by the longest run so far."""

    def __init__(self, seconds: float | None) -> None:
        self.seconds, self.start, self.longest = seconds, time.monotonic(), 0.0

    def fits(self) -> bool:
        return self.seconds is None or time.monotonic() - self.start + self.longest <= self.seconds

    def run_limit(self, cap: float, grace: float) -> float:
        """How long the next run may take: `cap`, or what is left of the budget plus `grace`."""
        if self.seconds is None:
            return cap
        return max(1.0, min(cap, self.seconds - (time.monotonic() - self.start) + grace))

    @contextlib.contextmanager
    def timing(self, typical: bool = True):
        """Time a run; only a `typical` one sets how long the next is expected to take."""
        t0 = time.monotonic()
        yield
        if typical:
            self.longest = max(self.longest, time.monotonic() - t0)


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _device() -> str:
    """The device and the releases that decide what compiles how (transformers moved its
    activation checkpointing from a block's __call__ into its forward between 5.17 and 5.25)."""
    from importlib.metadata import version

    import torch

    releases = (
        f"torch {torch.__version__}, transformers {version('transformers')}, deepspeed {version('deepspeed')}"
    )
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} ({releases}, CUDA {torch.version.cuda})"
    return f"CPU, {os.cpu_count()} cores ({releases})"


if __name__ == "__main__":
    main()
