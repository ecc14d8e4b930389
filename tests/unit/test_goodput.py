"""Goodput (`ds-train report`): the share of a run's wall time in training steps it kept, over all
attempts, with start-up, evaluation, saves and the steps a resumed attempt recomputed accounted for;
and the trainer logging the time accounting it is computed from."""

from __future__ import annotations

import json
import time

import pytest

from ds_train.report.goodput import goodput
from ds_train.report.series import load_run_metrics
from ds_train.train.trainer import PREEMPTED_EXIT_CODE, Trainer
from tests.helpers import run_cli
from tests.unit.stand_in_trainer import LogRecords, stand_in_trainer


def _line(step: int, steps: int, step_s: float, elapsed: float, **extra) -> dict:
    return {"step": step, "loss": 1.0, "interval_steps": steps, "step_time_s": step_s, "elapsed_s": elapsed,
            "eval_s": 0.0, "save_s": 0.0, **extra}  # fmt: skip


def test_two_attempts_with_a_resume():
    records = [
        # attempt 1: 20 s start-up, steps 1-30 at 1 s, a 5 s save after step 20 (logged at 30), dies
        _line(10, 10, 1.0, 30.0, startup_s=20.0),
        _line(20, 10, 1.0, 40.0),
        _line(30, 10, 1.0, 55.0, save_s=5.0),
        {"step": 30, "valid_loss": 2.0},  # evaluation records carry no time accounting
        # attempt 2 resumes from the step-20 checkpoint: steps 21-30 are done again, then 31-40
        _line(30, 10, 1.0, 25.0, startup_s=15.0),
        _line(40, 10, 1.0, 37.0, eval_s=2.0),
    ]
    g = goodput(records)
    assert g.attempts == 2
    assert g.wall_s == 55.0 + 37.0
    assert g.kept_s == 40.0  # steps 1-20 of attempt 1, 21-40 of attempt 2
    assert g.redone_s == 10.0  # attempt 1's steps 21-30
    assert (g.startup_s, g.save_s, g.eval_s) == (35.0, 5.0, 2.0)
    assert g.other_s == pytest.approx(92.0 - 40 - 10 - 35 - 5 - 2)
    assert g.ratio == pytest.approx(40 / 92)
    line = g.describe()
    assert line.startswith("goodput: 43.5% of 1.5 min (2 attempts) went to training steps that were kept;")
    assert "start-up 38.0%" in line and "steps redone after a resume 10.9%" in line


def test_a_resume_inside_a_log_interval_loses_only_its_steps():
    records = [
        _line(10, 10, 2.0, 30.0, startup_s=10.0),
        _line(15, 5, 2.0, 50.0, startup_s=10.0),  # resumed from step 10 (its first interval: 11-15)
    ]
    g = goodput(records)
    assert (g.kept_s, g.redone_s) == (30.0, 0.0)
    # a checkpoint at step 6 instead: attempt 1's steps 7-10 (4 × 2 s) were done twice
    records[1] = _line(15, 9, 2.0, 50.0, startup_s=10.0)
    g = goodput(records)
    assert (g.kept_s, g.redone_s) == (12.0 + 18.0, 8.0)


def test_metrics_without_time_accounting_give_none_or_are_counted_out():
    older = {"step": 10, "loss": 1.0, "step_time_s": 1.0}  # a line from before time accounting
    assert goodput([older]) is None
    assert goodput([]) is None
    g = goodput([older, _line(20, 10, 1.0, 30.0, startup_s=10.0)])
    assert (g.attempts, g.unaccounted_lines, g.kept_s) == (1, 1, 10.0)
    assert "1 earlier log lines carry no time accounting" in g.describe()


def test_report_prints_goodput_and_marks_a_resume_that_starts_after_the_last_logged_step(tmp_path):
    # preempted right after logging step 20 and checkpointing it: the next attempt logs 21 first
    records = [_line(10, 10, 1.0, 30.0, startup_s=10.0), _line(20, 10, 1.0, 40.0),
               _line(30, 10, 1.0, 25.0, startup_s=15.0)]  # fmt: skip
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert load_run_metrics(run).resumes == [20]  # the checkpoint it resumed from, not its first log line
    out = run_cli(["report", run]).stdout
    assert "resumed at step(s) 20" in out
    assert (
        "goodput: 46.2% of 1.1 min (2 attempts) went to training steps that were kept; start-up 38.5%" in out
    )


class _Records(LogRecords):
    def __init__(self, stop_at: int | None = None, hook_s: float = 0.0):
        super().__init__()
        self.stop_at, self.hook_s = stop_at, hook_s

    def on_step_start(self, trainer):
        if trainer.step == 0:
            time.sleep(self.hook_s)  # a slow first hook: step time, not start-up

    def on_step_end(self, trainer):
        if trainer.step == self.stop_at:
            trainer.request_stop("SIGUSR1")  # as the preemption handler does


SAVE_S = 0.05


def _trainer(records: _Records, log_every: int = 2) -> Trainer:
    return stand_in_trainer(
        [records], log_every=log_every, save_every=2, save=lambda *a, **k: time.sleep(SAVE_S)
    )


def test_the_trainer_logs_start_up_saves_and_elapsed_time():
    records = _Records(hook_s=0.3)
    assert _trainer(records).fit() == 0
    first, second, third = records.records
    assert "startup_s" not in second and "startup_s" not in third
    # start-up ends before the first step's hooks: their time is the first interval's
    assert 0 < first["startup_s"] < first["elapsed_s"] - 0.3
    assert first["step_time_s"] * first["interval_steps"] >= 0.3
    assert [r["interval_steps"] for r in records.records] == [2, 2, 2]
    # the save after step 2 shows in the line of step 4, the one after step 4 in step 6's
    assert first["save_s"] < SAVE_S / 10 and second["save_s"] >= SAVE_S and third["save_s"] >= SAVE_S
    assert first["elapsed_s"] < second["elapsed_s"] < third["elapsed_s"]
    g = goodput(records.records)
    assert g.attempts == 1 and 0 < g.ratio < 1 and g.save_s >= 2 * SAVE_S


def test_a_preempted_attempt_logs_its_steps_since_the_last_log_line():
    records = _Records(stop_at=3)
    assert _trainer(records, log_every=4).fit() == PREEMPTED_EXIT_CODE
    assert [(r["step"], r["interval_steps"]) for r in records.records] == [(3, 3)]
