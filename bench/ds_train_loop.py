"""ds-train's side of bench_trainer.py and gpu_bench.py: exactly `ds-train pretrain`, plus a clock.

`ds-train pretrain RUN.yaml [overrides]` is `pretrain.run(load_config(RUN.yaml, overrides))`; this
runs the same function with one more callback that reads the wall clock at the end of step WARMUP
and of step STEPS, the window the baselines time. That clock includes everything ds-train does
between steps (its per-step collective, the loader, the log intervals' reductions and metrics
writes), which the per-interval `tokens_per_s` in metrics.jsonl leaves out by construction (it
times steps, not logging). Both are printed; the comparisons use the wall clock.

--compile calls DeepSpeed's `engine.compile()` (torch.compile of the model) before the first step,
a variant for gpu_bench.py; on a GPU the peak allocated/reserved memory is reported too, and every
run reports the seconds from this script's start to the end of its first step.

    python -m torch.distributed.run --nproc_per_node 2 bench/ds_train_loop.py RUN.yaml STEPS WARMUP [--compile] [a.b=c ...]
"""

from __future__ import annotations

import gc
import itertools
import json
import os
import statistics
import sys
import time
from pathlib import Path


def main() -> None:
    launched = time.perf_counter()  # before torch, DeepSpeed and ds_train are imported
    from ds_train.distributed.engine import quiet_deepspeed

    quiet_deepspeed()
    import torch

    from ds_train.config import load_config
    from ds_train.train import pretrain
    from ds_train.train.callbacks.base import Callback
    from ds_train.train.callbacks.metrics_file import read_metrics

    path, steps, warmup, *rest = sys.argv[1:]
    steps, warmup = int(steps), int(warmup)
    compile_model = "--compile" in rest
    cfg = load_config(path, [x for x in rest if x != "--compile"])
    if cfg.train.max_steps != steps:
        raise SystemExit(f"train.max_steps={cfg.train.max_steps} but STEPS={steps}")

    class Clock(Callback):
        start = end = first_step = 0.0
        tokens_per_step = 0

        def __init__(self) -> None:
            # (wall, CPU) clock at the end of each step from WARMUP on
            self.marks: list[tuple[float, float]] = []
            self.gc_pauses: list[tuple[int, float]] = []
            self.gc_started = 0.0

        def on_train_start(self, trainer) -> None:
            gc.callbacks.append(self.gc_probe)
            if compile_model:
                trainer.engine.compile()
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()

        def gc_probe(self, phase: str, info: dict) -> None:
            """Python's collections inside the timed steps: (generation, pause) each."""
            if phase == "start":
                self.gc_started = time.perf_counter()
            elif self.start and not self.end:
                self.gc_pauses.append((info["generation"], time.perf_counter() - self.gc_started))

        def on_step_end(self, trainer) -> None:
            if not self.first_step:
                self.first_step = time.perf_counter()
            if trainer.step >= warmup:
                self.marks.append((time.perf_counter(), time.process_time()))
            if trainer.step == warmup:
                self.start = time.perf_counter()
                self.tokens_per_step = trainer.layout.global_batch_size * trainer.s.seq_len
            if trainer.step == steps:
                self.end = time.perf_counter()

    clock = Clock()
    code = pretrain.run(cfg, extra_callbacks=(clock,))
    if code:
        raise SystemExit(code)
    if os.environ.get("RANK", "0") != "0":
        return
    elapsed = clock.end - clock.start
    logged = [r for r in read_metrics(Path(cfg.run.output_dir)) if "loss" in r]
    records = [r for r in logged if r["step"] > warmup]
    result = {
        "system": "ds_train",
        "tokens_per_s": (steps - warmup) * clock.tokens_per_step / elapsed,
        "step_time_s": elapsed / (steps - warmup),
        "step_times": [b[0] - a[0] for a, b in itertools.pairwise(clock.marks)],
        # CPU seconds of this process (all its threads): the work done, whatever the
        # other users of the machine do.
        "cpu_step_times": [b[1] - a[1] for a, b in itertools.pairwise(clock.marks)],
        # What metrics.jsonl says for the same steps (log intervals after the first).
        "metrics_tokens_per_s": clock.tokens_per_step / statistics.mean(r["step_time_s"] for r in records),
        "mfu": statistics.median(r["mfu"] for r in records) if records[0].get("mfu") is not None else None,
        # the slowest rank's loader stall as a share of the step: MFU lost to input, if any
        "data_wait_frac": statistics.median(r["data_wait_frac"] for r in records),
        "loss": records[-1]["loss"],
        # Python's garbage collections inside the timed steps (rank 0), by generation
        "gc_collections": {g: sum(1 for x, _ in clock.gc_pauses if x == g) for g in (0, 1, 2)},
        "gc_pause_s": sum(t for _, t in clock.gc_pauses),
        "gc_pause_max_s": max((t for _, t in clock.gc_pauses), default=0.0),
        # start-up as a requeued job pays it: imports, process group, model build and init,
        # DeepSpeed engine, data plan, first batch and the first step (compilation included)
        "first_step_s": clock.first_step - launched,
        # the fullest rank's peak resident host memory (where CPU offload keeps what it moves)
        "host_peak_rss_gib": max(r["host_peak_rss_gib"] for r in logged),
    }
    if torch.cuda.is_available():  # the trainer resets the peaks at each log step: max of them all
        last = {
            "peak_allocated_gib": torch.cuda.max_memory_allocated(),
            "peak_reserved_gib": torch.cuda.max_memory_reserved(),
        }
        for key, since_last_log in last.items():
            result[key] = max([r[key] for r in logged] + [since_last_log / 2**30])
        result["alloc_retries"] = logged[-1]["alloc_retries"]
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    from process_exit import leave

    main()
    leave()
