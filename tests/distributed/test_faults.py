"""Faults injected into 2-process gloo runs (DS_TRAIN_FAULT, see train/callbacks/fault_injection.py):
nothing hangs, the user is told what happened and where, nothing beyond the last checkpoint is
lost, and re-running the same command reproduces the uninterrupted run. docs/reliability.md
tabulates each fault with its test and the measured reaction times."""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from ds_train.checkpoint.integrity import manifest_problems
from ds_train.checkpoint.layout import STATE_FILE, latest_checkpoint
from ds_train.data.loader import build_plan, rank_positions
from ds_train.distributed.deepspeed_config import BatchLayout
from tests.helpers import base_config, read_metrics, run_cli, torchrun, train_losses, write_config

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

TRAIN = {"max_steps": 8, "save_every": 4, "lr": 5e-3}
TIMEOUT_S = 10  # run.collective_timeout_s in these runs (default 600)


def _config(tmp_path: Path, name: str, shards: Path, **sections) -> tuple[Path, Path]:
    sections = {"train": TRAIN, "run": {"collective_timeout_s": TIMEOUT_S}, **sections}
    run_dir = tmp_path / name
    return write_config(tmp_path / f"{name}.yaml", base_config(run_dir, shards, **sections)), run_dir


def _faulted(cfg: Path, fault: str, **kw):
    """Run with DS_TRAIN_FAULT set; (process, seconds from the fault to the run's exit)."""
    proc = torchrun(["pretrain", cfg], env={"DS_TRAIN_FAULT": fault}, check=False, **kw)
    ended = time.time()
    at = re.search(r"DS_TRAIN_FAULT: \S+ on rank \d at ([\d.]+)", proc.stderr)
    assert proc.returncode != 0 and at, proc.stderr[-3000:]
    return proc, ended - float(at.group(1))


def _our_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("ds-train: error:")]


def _worker_traceback(stderr: str) -> str:
    """The first traceback a rank (or a process of its, a loader worker) printed, with the lines of
    that rank after it, for the assertion message; "" if none: failures must be one line each."""
    lines = stderr.splitlines()
    for i, line in enumerate(lines):
        found = re.match(r"^(\[rank\d\]:) Traceback", line)
        if found:
            return "\n".join(x for x in lines[i : i + 80] if x.startswith(found.group(1)))[:6000]
    return ""


@pytest.fixture(scope="module")
def reference(tmp_path_factory, shards) -> dict[int, float]:
    tmp = tmp_path_factory.mktemp("reference")
    cfg, run_dir = _config(tmp, "straight", shards)
    torchrun(["pretrain", cfg])
    return train_losses(run_dir)


def test_dead_rank_then_crash_in_save_then_resume_equals_uninterrupted(tmp_path, shards, reference):
    cfg, run_dir = _config(tmp_path, "run", shards)

    # 1. rank 1 is SIGKILLed after step 6: rank 0 must not hang, and must say who is gone
    proc, reaction = _faulted(cfg, "kill@step=6,rank=1")
    assert reaction < TIMEOUT_S, f"{reaction:.1f}s from the kill to the exit"
    ours = _our_lines(proc.stderr)
    assert len(ours) == 1 and "[rank 0] lost contact with other ranks in step 7" in ours[0], ours
    assert "rank(s) 1 did not answer" in ours[0] and "re-run to resume from step_00000004" in ours[0]
    assert re.search(r"rank\s*: 1 \(local_rank: 1\)\s+exitcode\s*: -9", proc.stderr)  # torchrun agrees
    assert not (tb := _worker_traceback(proc.stderr)), tb
    assert latest_checkpoint(run_dir / "checkpoints").step == 4

    # 2. the same command resumes, and rank 0 is killed inside the final save, after its files
    proc, _ = _faulted(cfg, "kill@save=8,rank=0")
    assert "resuming at step 4" in proc.stderr
    root = run_dir / "checkpoints"
    assert latest_checkpoint(root).step == 4 and (root / "step_00000008.partial").is_dir()
    assert not (root / "step_00000008").exists()

    # 3. the same command again: resumes from step 4 (the partial save is ignored, then removed)
    done = torchrun(["pretrain", cfg])
    assert "resuming at step 4" in done.stderr
    assert not list(root.glob("*.partial")) and latest_checkpoint(root).step == 8
    assert (
        manifest_problems(
            root / "step_00000008", json.loads((root / "step_00000008" / STATE_FILE).read_text())
        )
        == []
    )
    steps = [r["step"] for r in read_metrics(run_dir) if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 5, 6, 7, 8, 5, 6, 7, 8]
    resumed = train_losses(run_dir)  # the last record of each step: the completed run's
    for step in range(1, 9):
        assert resumed[step] == pytest.approx(reference[step], rel=1e-6, abs=0), step
    # every logged loss of the interrupted attempts matches too: nothing diverged before the faults
    for r in read_metrics(run_dir):
        if "loss" in r:
            assert r["loss"] == pytest.approx(reference[r["step"]], rel=1e-6, abs=0), r


def test_hung_rank_makes_the_others_exit_at_the_collective_timeout(tmp_path, shards):
    timeout = 5
    cfg, run_dir = _config(tmp_path, "run", shards, run={"collective_timeout_s": timeout})
    proc, reaction = _faulted(cfg, "hang@step=5,rank=1")
    assert timeout <= reaction < timeout + 15, f"{reaction:.1f}s from the hang to the exit"
    ours = _our_lines(proc.stderr)
    assert len(ours) == 1, ours
    assert f"Timed out waiting {timeout * 1000}ms" in ours[0] and "rank(s) 1 did not answer" in ours[0], ours
    assert not (tb := _worker_traceback(proc.stderr)), tb
    assert latest_checkpoint(run_dir / "checkpoints").step == 4


def test_disk_full_during_save_is_one_error_on_every_rank_and_keeps_the_last_checkpoint(tmp_path, shards):
    cfg, run_dir = _config(tmp_path, "run", shards)
    proc, reaction = _faulted(cfg, "enospc@save=8,rank=1")
    assert reaction < TIMEOUT_S, f"{reaction:.1f}s"
    ours = _our_lines(proc.stderr)
    assert len(ours) == 2, proc.stderr[-8000:]  # both ranks stop with the same explanation, neither waits
    for line in ours:
        assert "could not write checkpoint step_00000008 (rank 1: No space left on device" in line
        assert "checkpoints/step_00000004 is still the latest" in line
    assert not (tb := _worker_traceback(proc.stderr)), tb
    root = run_dir / "checkpoints"
    assert latest_checkpoint(root).step == 4
    previous = root / "step_00000004"
    assert manifest_problems(previous, json.loads((previous / STATE_FILE).read_text())) == []


def test_nonfinite_losses_are_named_skipped_counted_then_stop(tmp_path, shards):
    cfg, run_dir = _config(tmp_path, "run", shards, train={**TRAIN, "nonfinite": "skip", "max_nonfinite": 2})
    # step 3: NaN on rank 1 only (skipped); steps 6 and 7: NaN again, twice in a row (stop)
    proc = torchrun(
        ["pretrain", cfg], env={"DS_TRAIN_FAULT": "nan@step=3,rank=1;nan@step=6;nan@step=7"}, check=False
    )
    assert proc.returncode == 1
    plan = build_plan(str(shards / "train"), seed=7, shuffle=True, window=16)
    positions = rank_positions(2, 0, BatchLayout(8, 2, 2, 2), 1)  # step 3, micro-batch 0, rank 1
    source, shard, row = plan.locate(positions)
    where = ", ".join(plan.describe(int(a), int(b), int(c)) for a, b, c in zip(source, shard, row))
    assert (
        f"non-finite loss in step 3 on rank 1, micro-batch 0 (global samples {positions[0]}..{positions[-1]}: "
        f"{where}); update skipped" in proc.stderr
    ), proc.stderr[-3000:]
    ours = _our_lines(proc.stderr)
    assert len(ours) == 2 and all("2 consecutive non-finite steps" in line for line in ours), ours
    assert any("non-finite loss in step 7 on rank 0, micro-batch 0" in line for line in ours)
    assert not (tb := _worker_traceback(proc.stderr)), tb
    records = {r["step"]: r for r in read_metrics(run_dir) if "loss" in r}
    assert records[4]["nonfinite_steps"] == 1  # counted (a step late: the check costs no wait)
    assert all(np.isfinite(records[s]["loss"]) for s in (4, 5))  # the NaN update was not applied
    assert latest_checkpoint(run_dir / "checkpoints").step == 4


@pytest.mark.parametrize("stage", [2, 3])
def test_a_straggling_rank_is_named_in_the_metrics_the_log_and_the_report(tmp_path, shards, reference, stage):
    # a high warning ratio: two CPU ranks sharing two cores can differ by 20% on their own
    # ZeRO-3 gathering every parameter layer by layer, as for a model many times the prefetch
    # bucket (the tiny one would otherwise stay whole, or be gathered all at once before it runs)
    zero3 = {"stage": 3, "stage3_param_persistence_threshold": 0, "stage3_prefetch_bucket_size": 1}
    zero = {"stage": 2} if stage == 2 else zero3
    cfg, run_dir = _config(tmp_path, "run", shards, train={**TRAIN, "straggler_ratio": 5}, zero=zero)
    # from step 3 on, each of rank 1's forwards takes 200 ms longer (the model's own: a few ms),
    # inside its linear layers: under ZeRO-3, where the forward waits for every rank's parameter
    # gathers, only the layers' own time tells the ranks apart
    proc = torchrun(["pretrain", cfg], env={"DS_TRAIN_FAULT": "slow@step=3,rank=1,ms=200"})
    records = {r["step"]: r for r in read_metrics(run_dir) if "loss" in r}
    for step in range(3, 9):
        assert records[step]["slowest_rank"] == 1 and records[step]["slowest_forward_ratio"] > 5, records[
            step
        ]
    warned = [line for line in proc.stderr.splitlines() if "is a straggler" in line]
    assert len(warned) == 1 and "rank 1 on " in warned[0] and "in steps 4-4" in warned[0], warned
    assert "since step 3" in warned[0]  # warned at the second log line over the ratio
    losses = train_losses(run_dir)  # slower, not different
    assert losses == (reference if stage == 2 else pytest.approx(reference, rel=1e-4))
    report = run_cli(["report", run_dir, "--output", tmp_path / "report.png"]).stdout
    assert "slowest rank: rank 1 in " in report, report


def test_truncated_shard_is_named_or_skipped_and_counted(tmp_path, shards):
    data = tmp_path / "train"
    shutil.copytree(shards / "train", data)
    plan = build_plan(str(data), seed=7, shuffle=True, window=16)
    _, shard, _ = plan.locate(rank_positions(0, 0, BatchLayout(8, 2, 2, 2), 1))
    victim = data / plan.sources[0].names[int(shard[0])]  # rank 1 reads it in step 1
    with open(victim, "r+b") as fh:
        fh.truncate(victim.stat().st_size // 3)
    cfg, run_dir = _config(tmp_path, "stop", shards, data={"train": str(data), "num_workers": 1})
    proc = torchrun(["pretrain", cfg], check=False)
    assert proc.returncode != 0
    ours = _our_lines(proc.stderr)
    assert any(re.search(rf"\[rank 1\] shard {re.escape(str(victim))}: .*byte \d+", line) for line in ours), (
        ours
    )
    assert "Traceback" not in "\n".join(ours), ours
    assert not (tb := _worker_traceback(proc.stderr)), tb

    cfg, run_dir = _config(
        tmp_path, "skip", shards, data={"train": str(data), "num_workers": 1, "skip_corrupt": True}
    )
    done = torchrun(["pretrain", cfg])
    assert f"shard {victim}" in done.stderr and "data.skip_corrupt" in done.stderr
    final = [r for r in read_metrics(run_dir) if "loss" in r][-1]
    assert final["step"] == 8 and final["skipped_samples"] > 0 and np.isfinite(final["loss"])
