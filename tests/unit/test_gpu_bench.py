"""bench/gpu.sh and bench/gpu_bench.py are run on a lent GPU with a fixed allowance and no second
try: what can be checked without a GPU is checked here (the GPU run itself is in docs/benchmarks.md)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from tests.helpers import REPO, clean_env

sys.path.insert(0, str(REPO / "bench"))

from gpu_bench import Budget, tuned_choice, variants


def test_budget_skips_a_run_that_would_not_fit(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    budget = Budget(60)
    assert budget.fits()  # nothing measured yet: the first run always starts
    with budget.timing():
        now[0] += 25  # a 25 s run
    assert budget.fits()  # 25 s used; one more run as long as the longest ends at 50 s
    with budget.timing():
        now[0] += 11
    assert not budget.fits()  # 36 s used: another 25 s run would end at 61 s
    assert Budget(None).fits()
    budget = Budget(60)
    with budget.timing():
        now[0] += 10
    with budget.timing(typical=False):  # a run that compiled first: not how long the next will be
        now[0] += 30
    assert budget.fits()  # 40 s used, the next expected to take 10 s


def test_the_compiling_variants_are_the_ones_that_say_so():
    assert {v.name for v in variants(4, 16) if v.compiles} == {"compile", "compile_model"}


def test_variants_run_baseline_first_and_once_each():
    names = [v.name for v in variants(4, 16)]
    assert names[0] == "baseline"
    assert len(names) == len(set(names))
    # the knobs a short lease must not lose come right after the baseline
    assert names[1:8] == [
        "no_doc_mask", "flex_attention", "full_logits", "compile", "micro_8", "act_ckpt", "act_ckpt_half"
    ]  # fmt: skip
    half = next(v for v in variants(4, 16) if v.name == "act_ckpt_half")
    assert "model.activation_checkpointing_layers=8" in half.overrides and half.knob == "micro"


def test_the_tuned_run_takes_each_knobs_best_gain_and_never_a_measuring_or_math_changing_variant():
    all_variants = variants(4, 16)
    tps = {
        "baseline": 100.0,
        "micro_8": 110.0,
        "act_ckpt": 104.0,  # the same knob as micro_8, less gain
        "zero1": 100.5,  # under 1%: noise
        "overlap_comm": 97.0,
        "no_doc_mask": 130.0,  # trains something else
        "tput_timer_sync": 125.0,  # puts back syncs ds-train removed: a noisy win must not be kept
        "buckets_2e8": 103.0,
        "compile": 108.0,
        "compile_model": 115.0,  # engine.compile(): not a ds-train option, so not reproducible by config
    }
    best = tuned_choice(all_variants, {name: {"tokens_per_s": t} for name, t in tps.items()})
    assert {knob: v.name for knob, v in best.items()} == {
        "micro": "micro_8",
        "buckets": "buckets_2e8",
        "compile": "compile",
    }
    # what the tuned run combines is a set of `ds-train pretrain` overrides, nothing else
    assert all(not v.compile and v.overrides for v in best.values())


def test_gpu_sh_refuses_to_run_without_a_gpu():
    assert subprocess.run(["bash", "-n", REPO / "bench/gpu.sh"]).returncode == 0
    if "cuda" in subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.is_available() and 'cuda')"],
                                capture_output=True, text=True).stdout:  # fmt: skip
        pytest.skip("a GPU is visible")
    proc = subprocess.run(
        ["bash", REPO / "bench/gpu.sh"],
        env=clean_env({"PYTHON": sys.executable}),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "no CUDA device" in proc.stderr
