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
from ds_train.train.callbacks.step_profiler import StepProfiler, window_notes
from ds_train.train.pretrain import standard_callbacks
from ds_train.train.trace_summary import load_trace
from tests.unit.stand_in_trainer import stand_in_batches, stand_in_trainer

STEP_SLEEP_S = 0.01


def _train(cb: StepProfiler, first: int, last: int, stop_before: int | None = None) -> None:
    """Steps first..last as the trainer calls the hooks; `stop_before`: a stop request found at the
    top of that step (preemption), after on_step_start."""
    trainer = SimpleNamespace(step=first - 1)
    cb.on_train_start(trainer)
    x = torch.randn(64, 64)
    for step in range(first, last + 1):
        cb.on_step_start(trainer)
        if step == stop_before:
            break
        x = torch.tanh(x @ x)
        time.sleep(STEP_SLEEP_S)
        trainer.step = step
        cb.on_step_end(trainer)
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
    _train(cb, 1, 10, stop_before=5)  # preempted: the stop is agreed at the top of step 5
    window = tmp_path / "profile" / "steps_3-6"
    # the trace's last annotation holds the stop (step 5 began, then checkpointed and left), so the
    # summary keeps the finished steps only
    assert _recorded_steps(window) == [3, 4, 5]
    assert json.loads((window / "rank0.summary.json").read_text())["steps"] == [3, 4]
    # stopped during the warm-up: nothing recorded, nothing written
    early = StepProfiler(ProfileSection(start_step=5, steps=2, warmup_steps=2), tmp_path / "early", rank=0)
    _train(early, 1, 10, stop_before=4)
    assert not (tmp_path / "early" / "profile").exists()


class _FailingLoader:
    """The stand-in trainer's batches, raising at the first micro-batch of step `fail_at`."""

    def __init__(self, fail_at: int):
        self.inner, self.fail_at = stand_in_batches(), fail_at

    def __iter__(self):
        for batch in self.inner:
            if int(batch["step"]) + 1 == self.fail_at:
                raise OSError("shard server gone")
            yield batch


def test_the_trainer_drives_it_and_an_error_inside_the_window_still_writes(tmp_path):
    whole = StepProfiler(ProfileSection(start_step=3, steps=2, warmup_steps=1), tmp_path / "a", rank=0)
    assert stand_in_trainer([whole]).fit() == 0
    assert _recorded_steps(tmp_path / "a" / "profile" / "steps_3-4") == [3, 4]

    failing = StepProfiler(ProfileSection(start_step=3, steps=3, warmup_steps=1), tmp_path / "b", rank=0)
    with pytest.raises(OSError, match="shard server gone"):  # the error itself still propagates
        stand_in_trainer([failing], _FailingLoader(fail_at=5)).fit()
    window = tmp_path / "b" / "profile" / "steps_3-5"
    assert json.loads((window / "rank0.summary.json").read_text())["steps"] == [3, 4]


def test_a_failing_write_is_logged_not_raised(tmp_path, caplog):
    (tmp_path / "profile").write_text("a file where the profile directory should go")
    cb = StepProfiler(ProfileSection(start_step=2, steps=1, warmup_steps=1), tmp_path, rank=0)
    _train(cb, 1, 4)  # training goes on
    assert "profile: could not write" in caplog.text


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


def test_window_notes_name_saves_evaluations_and_missing_ranks():
    cfg = from_dict(
        {
            **_config(start_step=4, steps=3, ranks=[0, 2, 5]),
            "train": {
                "max_steps": 10,
                "global_batch_size": 8,
                "micro_batch_size": 4,
                "save_every": 5,
                "eval_every": 0,
            },
        }
    )
    assert window_notes(cfg, world_size=3) == [
        "profile.ranks [5]: no such rank among 3; they record nothing",
        "profile: step 5 includes a checkpoint save, which its ProfilerStep annotation holds too",
    ]
    assert window_notes(from_dict(_config()), world_size=1) == []
