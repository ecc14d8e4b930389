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
