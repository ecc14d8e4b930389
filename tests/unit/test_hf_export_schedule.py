"""Which checkpoints `train.export_hf_every` exports: decided by step, so an attempt resumed from a
checkpoint exports what an uninterrupted run would, and finishes an export its predecessor lost.
(The exports' contents: tests/distributed/test_convert.py.)"""

from __future__ import annotations

from types import SimpleNamespace

from ds_train.checkpoint.layout import checkpoints_dir, tag_for_step
from ds_train.train.hf_export import EXPORTS_DIR, PeriodicHfExport


def _attempt(run_dir, saves: list[int], *, start: int = 0, every: int = 2, branch: bool = False) -> list[int]:
    """One attempt from `start` (the run's own checkpoint, or with `branch` another run's,
    run.start_from) whose saves complete at `saves`; the steps it exports."""
    if start and not branch:
        (checkpoints_dir(run_dir) / tag_for_step(start)).mkdir(parents=True, exist_ok=True)
    cb = PeriodicHfExport(run_dir, every, save_every=2, max_steps=11)
    exported: list[int] = []
    cb._export = exported.append
    trainer = SimpleNamespace(step=start, last_saved_step=start or -1, stopped_early=False)
    cb.on_train_start(trainer)
    for step in range(start + 1, 12):
        trainer.step = step
        if step in saves:
            trainer.last_saved_step = step
        cb.on_step_end(trainer)
        if step == saves[-1]:
            break
    cb.on_train_end(trainer)
    return exported


def test_every_nth_scheduled_save_and_the_last_step(tmp_path):
    assert _attempt(tmp_path, [2, 4, 6, 8, 10, 11]) == [4, 8, 11]
    assert _attempt(tmp_path, [2, 4, 5], every=2) == [4]  # a preemption save (5) is off the schedule
    assert _attempt(tmp_path, [2, 4, 5], every=1) == [2, 4, 5]  # every checkpoint


def test_a_resumed_attempt_exports_what_an_uninterrupted_run_would(tmp_path):
    (tmp_path / EXPORTS_DIR / tag_for_step(4)).mkdir(parents=True)  # the first attempt's export of 4
    assert _attempt(tmp_path, [6, 8, 10, 11], start=4) == [8, 11]  # not 4 again, and not 6
    # an attempt killed after saving step 8, before its export existed: the next one makes it
    assert _attempt(tmp_path, [10, 11], start=8) == [8, 11]
    assert _attempt(tmp_path, [8], start=6) == [8]  # resumed from a checkpoint not due: nothing at start


def test_a_branch_does_not_export_the_other_runs_checkpoint(tmp_path):
    """A branch (run.start_from) starts at another run's checkpoint: not one of its own to convert."""
    assert _attempt(tmp_path, [10, 11], start=8, branch=True) == [11]
    assert _attempt(tmp_path, [10, 11], start=8) == [8, 11]  # the run's own step 8, export lost: made
