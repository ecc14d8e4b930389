"""run.start_from: a new run branched off another run's checkpoint. Which checkpoint a start
loads, what it refuses, and what the branch records (lineage, the data stream's history, the
report), on state-only checkpoints; the training itself is in tests/distributed/test_start_from.py."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from ds_train.checkpoint.layout import CheckpointRef
from ds_train.checkpoint.start_point import (
    lineage,
    own_step,
    read_lineage,
    start_note,
    start_point,
    write_lineage,
)
from ds_train.config import ConfigError, load_config
from ds_train.data.batch_schedule import BatchSchedule
from ds_train.data.stream_origin import (
    FRESH,
    StreamOrigin,
    StreamSegment,
    inherited_history,
    read_history,
    record_segment,
)
from ds_train.report.plots import summary
from ds_train.report.series import load_run_metrics
from ds_train.train import pretrain
from ds_train.train.session import nothing_to_train
from tests.helpers import base_config, state_only_checkpoint, write_config

STATE = {"world_size": 2, "zero_stage": 2, "global_batch_size": 8}


@pytest.fixture
def parent(tmp_path, shards):
    """Run `parent` with state-only checkpoints at steps 2 and 4 (latest: 4)."""
    cfg_file = write_config(tmp_path / "parent.yaml", base_config(tmp_path / "parent", shards))
    state_only_checkpoint(cfg_file, 2, **STATE)
    state_only_checkpoint(cfg_file, 4, **STATE)
    return tmp_path / "parent"


def _branch(tmp_path, shards, start_from, *overrides):
    cfg_file = write_config(tmp_path / "branch.yaml", base_config(tmp_path / "branch", shards))
    return load_config(cfg_file, [f"run.start_from={start_from}", *overrides])


def test_start_from_names_a_run_or_a_step(tmp_path, shards, parent):
    assert start_point(_branch(tmp_path, shards, parent).run).step == 4  # the run's latest
    assert start_point(_branch(tmp_path, shards, parent / "checkpoints").run).step == 4
    step2 = parent / "checkpoints" / "step_00000002"
    ref = start_point(_branch(tmp_path, shards, step2).run)
    assert ref.path == step2
    cfg = _branch(tmp_path, shards, step2)
    assert own_step(ref, cfg.run.output_dir) is None  # not the branch's own checkpoint
    assert start_note(ref, cfg.run.output_dir) == f"branches off {step2} (run.start_from)"
    # run.resume=never means "not over checkpoints of my own": a branch starts; require is met
    assert start_point(_branch(tmp_path, shards, step2, "run.resume=never").run).step == 2
    assert start_point(_branch(tmp_path, shards, step2, "run.resume=require").run).step == 2


def test_own_checkpoints_win_over_start_from(tmp_path, shards, parent):
    """A requeued branch resumes from its own latest checkpoint, never branches off again."""
    cfg_file = write_config(tmp_path / "branch.yaml", base_config(tmp_path / "branch", shards))
    state_only_checkpoint(cfg_file, 6, **STATE)
    cfg = load_config(cfg_file, [f"run.start_from={parent}"])
    ref = start_point(cfg.run)
    assert ref.step == 6 and own_step(ref, cfg.run.output_dir) == 6
    assert start_note(ref, cfg.run.output_dir).startswith("resumes from")
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        start_point(load_config(cfg_file, [f"run.start_from={parent}", "run.resume=never"]).run)


def test_start_from_refusals(tmp_path, shards, parent):
    with pytest.raises(ConfigError, match=r"run.start_from is empty \(an unset shell variable\?\)"):
        pretrain.check(_branch(tmp_path, shards, ""), world_size=2)
    with pytest.raises(ConfigError, match="run.start_from: no checkpoint found under"):
        start_point(_branch(tmp_path, shards, tmp_path / "nowhere").run)
    with pytest.raises(ConfigError, match="complete ones there: step_00000002, step_00000004"):
        start_point(_branch(tmp_path, shards, parent / "checkpoints" / "step_00000003").run)  # pruned
    (parent / "checkpoints" / "step_00000006").mkdir()  # a plain DeepSpeed save: no ds_train state
    with pytest.raises(ConfigError, match="not a complete ds-train checkpoint"):
        start_point(_branch(tmp_path, shards, parent / "checkpoints" / "step_00000006").run)
    own = load_config(tmp_path / "parent.yaml", [f"run.start_from={parent}", "run.resume=never"])
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        start_point(own.run)
    # the parent's own directory, once it has no checkpoint of its own: still not a branch
    empty = tmp_path / "empty"
    (empty / "checkpoints" / "step_00000001").mkdir(parents=True)
    (empty / "checkpoints" / "step_00000001" / "ds_train_state.json").write_text('{"step": 1}')
    cfg_file = write_config(tmp_path / "e.yaml", base_config(tmp_path / "e", shards))
    cfg = load_config(cfg_file, [f"run.output_dir={tmp_path / 'e'}", f"run.start_from={tmp_path / 'e'}"])
    with pytest.raises(ConfigError, match="no checkpoint found"):
        start_point(cfg.run)


def test_a_requeued_branch_keeps_its_branch_point(tmp_path, shards, parent):
    """Killed before its first save, a branch off a run directory restarts from the checkpoint it
    chose at its first start, though that run has saved a newer one since."""
    cfg = _branch(tmp_path, shards, parent)
    first = start_point(cfg.run)
    ancestry = lineage(first.state(), first, cfg.run.output_dir)
    write_lineage(cfg.run.output_dir, cfg.run.start_from, ancestry)  # as the first start does
    state_only_checkpoint(tmp_path / "parent.yaml", 6, **STATE)  # the parent saves on
    assert start_point(_branch(tmp_path, shards, parent).run).step == 4
    assert read_lineage(cfg.run.output_dir) == ancestry
    # another run.start_from given before the first save: branches anew
    step2 = parent / "checkpoints" / "step_00000002"
    assert start_point(_branch(tmp_path, shards, step2).run).step == 2
    # the pinned checkpoint pruned meanwhile: refused, not silently another step
    (parent / "checkpoints" / "step_00000004" / "ds_train_state.json").unlink()
    with pytest.raises(ConfigError, match="the checkpoint this run branched off at its first start, is gone"):
        start_point(_branch(tmp_path, shards, parent).run)


def test_a_damaged_branch_point_names_an_older_one_never_the_other_runs_latest(tmp_path, shards, parent):
    step4 = parent / "checkpoints" / "step_00000004"
    state = json.loads((step4 / "ds_train_state.json").read_text())
    (step4 / "ds_train_state.json").write_text(
        json.dumps({**state, "files": {"mp_rank_00_model_states.pt": 10}})
    )
    with pytest.raises(Exception) as e:
        pretrain.check(_branch(tmp_path, shards, parent), world_size=2)
    assert f"set run.start_from={parent / 'checkpoints' / 'step_00000002'}" in str(e.value)
    assert "latest" not in str(e.value)
    with pytest.raises(Exception) as e:  # the run's own: its own latest pointer
        pretrain.check(load_config(tmp_path / "parent.yaml"), world_size=2)
    assert "write step_00000002 into" in str(e.value)


def test_preflight_checks_the_branch_point_like_a_resume(tmp_path, shards, parent):
    cfg = _branch(tmp_path, shards, parent)
    assert pretrain.check(cfg, world_size=2).resume_from.step == 4
    # another global batch: refused as a resume would be, naming the branch point and its remedy
    with pytest.raises(ConfigError) as e:
        pretrain.check(_branch(tmp_path, shards, parent, "train.global_batch_size=16"), world_size=2)
    assert "run.start_from's" in str(e.value) and "without run.start_from" in str(e.value)
    assert "run.force_resume=true" in str(e.value)
    forced = _branch(tmp_path, shards, parent, "train.global_batch_size=16", "run.force_resume=true")
    assert pretrain.check(forced, world_size=2).resume_from.step == 4
    # other data: the way out is another branch point, not another run directory
    step4 = parent / "checkpoints" / "step_00000004"
    state = json.loads((step4 / "ds_train_state.json").read_text())
    (step4 / "ds_train_state.json").write_text(json.dumps({**state, "data": {"fingerprint": "other"}}))
    with pytest.raises(ConfigError) as e:
        pretrain.check(_branch(tmp_path, shards, parent), world_size=2)
    assert "or start afresh without run.start_from (or run.force_resume=true" in str(e.value)


def test_a_branch_at_or_past_max_steps_has_nothing_to_train(tmp_path, shards, parent):
    cfg = _branch(tmp_path, shards, parent, "train.max_steps=4")
    pre = SimpleNamespace(resume_from=start_point(cfg.run), launch=SimpleNamespace(world_size=2))
    assert "run.start_from's checkpoint" in nothing_to_train(cfg, pre)
    cfg = _branch(tmp_path, shards, parent, "train.max_steps=5")
    assert nothing_to_train(cfg, pre) is None


def test_lineage_appends_the_branch_point(tmp_path, parent):
    ref = CheckpointRef(parent / "checkpoints", "step_00000004")
    grand = {"checkpoint": "/runs/base/checkpoints/step_00000100", "step": 100, "run_dir": "/runs/base"}
    chain = lineage({"lineage": [grand]}, ref, tmp_path / "branch")
    assert chain[0] == grand
    assert chain[1] == {"checkpoint": str(ref.path.resolve()), "step": 4, "run_dir": str(parent.resolve())}
    # resuming a branch from its own checkpoint keeps its lineage as it is
    own = CheckpointRef(tmp_path / "branch" / "checkpoints", "step_00000006")
    assert lineage({"lineage": chain}, own, tmp_path / "branch") == chain
    assert lineage({}, own, tmp_path / "branch") == []


def test_branch_inherits_the_history_its_checkpoint_recorded(tmp_path):
    """The parent was later resumed from before the branch point onto other data: its file no
    longer says what the branch point's steps trained; the checkpoint's own record does."""
    batch = BatchSchedule.of(8, ())
    kept = [StreamSegment(FRESH, "old", batch), StreamSegment(StreamOrigin(3, 24), "new", batch)]
    parent = tmp_path / "parent"
    parent.mkdir()
    rewritten = [StreamSegment(FRESH, "old", batch), StreamSegment(StreamOrigin(2, 16), "other", batch)]
    (parent / "data_stream.jsonl").write_text("".join(s.as_json() + "\n" for s in rewritten))
    state = {"step": 5, "data_stream": [json.loads(s.as_json()) for s in kept]}
    assert inherited_history(state, parent) == kept
    assert inherited_history({"step": 5}, parent) == rewritten  # checkpoints from before the record


def test_branch_carries_the_parents_data_stream_history(tmp_path):
    """The parent was forced onto other data at step 3; a branch off its step 5 keeps that record
    (for `ds-train data order|show`), and drops the parent's later segments."""
    batch = BatchSchedule.of(8, ())
    parent, branch = tmp_path / "parent", tmp_path / "branch"
    parent.mkdir()
    history = [
        StreamSegment(FRESH, "old", batch),
        StreamSegment(StreamOrigin(3, 24), "new", batch),
        StreamSegment(StreamOrigin(8, 0), "newer", batch),
    ]
    (parent / "data_stream.jsonl").write_text("".join(s.as_json() + "\n" for s in history))
    branch.mkdir()
    state = {"step": 5, "data": {"fingerprint": "new"}, "global_batch_size": 8}
    segment = StreamSegment(StreamOrigin(5, 40), "new", batch)  # continues the parent's stream
    record_segment(branch, state, segment, read_history(parent))
    assert read_history(branch) == history[:2]
    # without the inherited history the branch would know of no change before step 5
    alone = tmp_path / "alone"
    alone.mkdir()
    record_segment(alone, state, segment)
    assert read_history(alone) == []


def test_report_draws_the_parent_before_the_branch(tmp_path):
    parent, branch = tmp_path / "parent", tmp_path / "branch"
    for run, steps, base in ((parent, range(1, 9), 5.0), (branch, range(5, 9), 3.0)):
        run.mkdir()
        lines = [{"step": s, "loss": base - 0.1 * s, "interval_steps": 1} for s in steps]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    ckpt = parent / "checkpoints" / "step_00000004"
    write_lineage(branch, str(ckpt), [{"checkpoint": str(ckpt), "step": 4, "run_dir": str(parent)}])
    assert read_lineage(branch)[0]["step"] == 4
    metrics = load_run_metrics(branch)
    assert metrics.before_branch.steps == [1, 2, 3, 4]  # the parent's, up to the branch point
    assert metrics.before_branch.values == pytest.approx([4.9, 4.8, 4.7, 4.6])
    assert metrics.loss.steps == [5, 6, 7, 8] and metrics.resumes == []
    assert summary(metrics)[0] == f"branched off {ckpt} (step 4)"
    assert not len(load_run_metrics(parent).before_branch)
