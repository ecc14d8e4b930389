"""Finding the latest complete checkpoint; partial saves are never picked."""

from __future__ import annotations

import json

from ds_train.checkpoint.layout import STATE_FILE, latest_checkpoint, resolve_checkpoint, tag_for_step


def _make(root, step, complete=True):
    d = root / tag_for_step(step)
    d.mkdir(parents=True)
    if complete:
        (d / STATE_FILE).write_text(json.dumps({"step": step}))
    return d


def test_latest_pointer_and_fallback(tmp_path):
    root = tmp_path / "checkpoints"
    _make(root, 100)
    _make(root, 200)
    (root / "latest").write_text("step_00000100")
    assert latest_checkpoint(root).step == 100  # the pointer wins
    (root / "latest").write_text("step_00000300")  # stale pointer (crash between rename and pointer)
    assert latest_checkpoint(root).step == 200
    (root / "latest").unlink()
    assert latest_checkpoint(root).step == 200


def test_partial_and_incomplete_are_ignored(tmp_path):
    root = tmp_path / "checkpoints"
    _make(root, 100)
    (root / "step_00000200.partial").mkdir()
    _make(root, 300, complete=False)
    assert latest_checkpoint(root).step == 100
    assert resolve_checkpoint(tmp_path).step == 100  # from the run dir
    assert resolve_checkpoint(root / "step_00000100").step == 100


def test_an_unreadable_state_file_makes_the_checkpoint_damaged(tmp_path):
    """A state file cut short or overwritten (a copy interrupted, a bad disk) used to surface as a
    JSONDecodeError or KeyError traceback at resume and in `convert`; it is a damaged checkpoint,
    named, with the one before it as the way back."""
    import pytest

    from ds_train.checkpoint.integrity import CheckpointDamaged
    from ds_train.checkpoint.layout import recorded_state

    root = tmp_path / "checkpoints"
    _make(root, 100)
    state = _make(root, 200) / STATE_FILE
    ref = latest_checkpoint(root)
    assert ref.state() == {"step": 200}
    for damaged in ('{"step": 200, "da', "\x00\xff garbage", '{"data": {}}', '{"step": "200"}', "[1]"):
        state.write_bytes(damaged.encode("latin-1"))
        with pytest.raises(
            CheckpointDamaged,
            match=r"step_00000200 is damaged \(ds_train_state.json .*write step_00000100 into",
        ):
            ref.state()
        with pytest.raises(CheckpointDamaged):
            recorded_state(ref.path)
