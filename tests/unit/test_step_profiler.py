"""The `profile` section: torch.profiler records exactly the configured training steps, labelled
with their step numbers, whatever step the run starts or stops at, and writes a summary of them."""

from __future__ import annotations

import json
import time
from types import SimpleNamespace

import pytest
import torch

from ds_train.config import from_dict
from ds_train.config.schema import ProfileSection
from ds_train.train.callbacks.step_profiler import StepProfiler
from ds_train.train.pretrain import standard_callbacks
from ds_train.train.trace_summary import load_trace

STEP_SLEEP_S = 0.01


def _train(cb: StepProfiler, first: int, last: int, stop_after: int | None = None) -> None:
    """Steps first..last as the trainer runs them: work, then on_step_end; on_train_end at the end."""
    trainer = SimpleNamespace(step=first - 1)
    cb.on_train_start(trainer)
    x = torch.randn(64, 64)
    for step in range(first, last + 1):
        x = torch.tanh(x @ x)
        time.sleep(STEP_SLEEP_S)
        trainer.step = step
        cb.on_step_end(trainer)
        if step == stop_after:
            break
    cb.on_train_end(trainer)


def _recorded_steps(window_dir, rank: int = 0) -> list[int]:
    events = load_trace(window_dir / f"rank{rank}.pt.trace.json.gz")
    return sorted(
        int(e["name"].split("#")[1]) for e in events if e.get("name", "").startswith("ProfilerStep#")
    )


def test_records_the_window_with_training_step_numbers(tmp_path, caplog):
    cb = StepProfiler(ProfileSection(start_step=5, steps=3, warmup_steps=2), tmp_path, rank=3)
    with caplog.at_level("INFO", logger="ds_train"):
        _train(cb, 1, 12)
    window = tmp_path / "profile" / "steps_5-7"
    assert sorted(p.name for p in window.iterdir()) == [
        "rank3.ops.txt",
        "rank3.pt.trace.json.gz",
        "rank3.summary.json",
    ]
    assert _recorded_steps(window, rank=3) == [5, 6, 7]  # not the warm-up steps 3-4, nothing after
    assert "aten::mm" in (window / "rank3.ops.txt").read_text()
    summary = json.loads((window / "rank3.summary.json").read_text())
    assert summary["steps"] == [5, 6, 7]
    assert all(ms >= 1e3 * STEP_SLEEP_S for ms in summary["step_ms"])
    assert summary["device"] is None  # a CPU trace has no kernels
    assert (
        f"profile (rank 3): steps 5-7: {sum(summary['step_ms']) / 3:,.1f} ms/step -> {window}" in caplog.text
    )


def test_no_warmup_records_from_the_first_step(tmp_path):
    cb = StepProfiler(ProfileSection(start_step=1, steps=2, warmup_steps=0), tmp_path, rank=0)
    _train(cb, 1, 4)
    assert _recorded_steps(tmp_path / "profile" / "steps_1-2") == [1, 2]


def test_a_resumed_run_records_only_a_window_still_ahead(tmp_path):
    past = StepProfiler(ProfileSection(start_step=4, steps=2, warmup_steps=1), tmp_path / "past", rank=0)
    _train(past, 8, 10)  # resumed from step 7
    assert not (tmp_path / "past" / "profile").exists()
    # resumed from step 3, inside the warm-up: the warm-up is shorter, the recording the same
    inside = StepProfiler(ProfileSection(start_step=5, steps=2, warmup_steps=3), tmp_path / "in", rank=0)
    _train(inside, 4, 9)
    assert _recorded_steps(tmp_path / "in" / "profile" / "steps_5-6") == [5, 6]


def test_a_run_stopping_inside_the_window_writes_what_it_recorded(tmp_path):
    cb = StepProfiler(ProfileSection(start_step=3, steps=4, warmup_steps=1), tmp_path, rank=0)
    _train(cb, 1, 10, stop_after=4)  # preempted after step 4
    window = tmp_path / "profile" / "steps_3-6"
    # the trace's last annotation holds the end of training (step() opened it for step 5), so the
    # summary leaves it out
    assert _recorded_steps(window) == [3, 4, 5]
    assert json.loads((window / "rank0.summary.json").read_text())["steps"] == [3, 4]
    # stopped during the warm-up: nothing recorded, nothing written
    early = StepProfiler(ProfileSection(start_step=5, steps=2, warmup_steps=2), tmp_path / "early", rank=0)
    _train(early, 1, 10, stop_after=3)
    assert not (tmp_path / "early" / "profile").exists()


def _config(**profile) -> dict:
    return {
        "run": {"output_dir": "runs/x", "tensorboard": False},
        "model": {"config": "c.json"},
        "data": {"train": "shards"},
        "train": {"max_steps": 10, "global_batch_size": 8, "micro_batch_size": 4},
        "profile": profile,
    }


@pytest.mark.parametrize(
    ("profile", "recording_ranks"),
    [
        ({}, []),
        ({"start_step": 3}, [0]),
        ({"start_step": 3, "ranks": [1]}, [1]),
        ({"start_step": 3, "ranks": "all"}, [0, 1]),
    ],
)
def test_standard_callbacks_profile_the_selected_ranks(profile, recording_ranks):
    cfg = from_dict(_config(**profile))
    recording = []
    for rank in (0, 1):
        ctx = SimpleNamespace(rank=rank, is_main=rank == 0, world_size=2)
        if any(isinstance(cb, StepProfiler) for cb in standard_callbacks(cfg, ctx)):
            recording.append(rank)
    assert recording == recording_ranks
