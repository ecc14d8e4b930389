"""bench/gpu.sh and bench/gpu_bench.py are run on a lent GPU with a fixed allowance and no second
try: what can be checked without a GPU is checked here (the GPU run itself is in docs/benchmarks.md)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import REPO, clean_env

sys.path.insert(0, str(REPO / "bench"))

from gpu_bench import TIMED_OUT, Budget, run_killable, tuned_choice, variants


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


def test_a_run_may_last_what_is_left_of_the_budget(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    budget = Budget(300)
    assert budget.run_limit(420, 30) == 330  # the whole budget and the grace, under the cap
    now[0] = 250.0
    assert budget.run_limit(420, 30) == 80
    now[0] = 400.0
    assert budget.run_limit(420, 30) == 1.0  # over already: killed at once rather than never
    assert Budget(None).run_limit(420, 30) == 420


def test_a_run_past_its_time_is_killed_with_its_children(tmp_path):
    """torchrun's ranks are its children: killing torchrun alone would leave a rank on the GPU."""
    pid_file = tmp_path / "child"
    script = f"sleep 60 & echo $! > {pid_file}; wait"
    t0 = time.monotonic()
    code, _, _ = run_killable(["bash", "-c", script], clean_env(), timeout_s=1.0)
    assert code == TIMED_OUT and time.monotonic() - t0 < 30
    child = int(pid_file.read_text())
    for _ in range(50):  # gone, or a zombie waiting for a parent (the container's init) to reap it
        stat = Path(f"/proc/{child}/stat")
        if not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] == "Z":
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"the run's child {child} outlived the kill")
    assert run_killable([sys.executable, "-c", "print('ok')"], clean_env(), 30) == (0, "ok\n", "")


def test_the_compiling_variants_are_the_ones_that_say_so():
    assert {v.name for v in variants(4, 16) if v.compiles} == {"candidate", "compile", "compile_model"}


def test_variants_run_baseline_first_and_once_each():
    names = [v.name for v in variants(4, 16)]
    assert names[0] == "baseline"
    assert len(names) == len(set(names))
    # the likeliest best combination, then the knobs a short lease must not lose, come right after
    # the baseline; the ones that cannot win on one GPU come last (a budget cuts them first)
    assert names[1:6] == ["candidate", "flex_attention", "compile", "loss_chunk_4096", "micro_8"]
    assert set(names[-4:]) == {"overlap_comm", "buckets_2e8", "buckets_1e9", "no_contiguous_grads"}
    candidate = next(v for v in variants(4, 16) if v.name == "candidate")
    assert "train.micro_batch_size=8" in candidate.overrides and candidate.needs == "cuda"
    half = next(v for v in variants(4, 16) if v.name == "act_ckpt_half")
    assert "model.activation_checkpointing_layers=8" in half.overrides and half.knob == "micro"
    norms = next(v for v in variants(4, 16, log_every=5) if v.name == "per_layer_norms")
    assert (
        norms.overrides == ["train.per_layer_norms_every=5"] and not norms.tunable
    )  # a cost, never tuned in


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
        "candidate": 150.0,  # a combination of knobs, measured as one: the tuned run is built from single knobs
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


def test_the_anchor_summary_keeps_what_ran_when_a_system_fails():
    """One failed system (the HF Trainer's import on an image, a hang) must not take the others'
    ratios with it: a lent GPU gives no second try."""
    from bench_trainer import summarise, table

    def run(tps):
        return {"tokens_per_s": tps, "tokens_per_cpu_s": tps / 2, "tokens_per_s_best": tps * 1.1,
                "metrics_tokens_per_s": tps}  # fmt: skip

    runs = {"bare": [run(100.0)], "ds_train": [run(99.0)], "hf_trainer": [{"error": "exit 1: ImportError"}]}
    res = summarise(runs, ["bare", "ds_train", "hf_trainer"])
    assert res["wall"] == {"ds_train/bare": 0.99} and res["failed"] == {"hf_trainer": ["exit 1: ImportError"]}
    rows = table({"stages": {2: res}}, ["bare", "ds_train", "hf_trainer"]).splitlines()
    assert rows[2].startswith("| 2 | wall | 100 | 99 | failed | 0.990 | - |")
