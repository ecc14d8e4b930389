"""train.save_async on 2 gloo ranks: the background checkpoints are byte for byte the ones a
foreground save writes (DeepSpeed's real state: flat buffers, ZeRO partitions), and a run killed
while training on from one resumes exactly."""

from __future__ import annotations

import json

import pytest

from ds_train.checkpoint.layout import STATE_FILE, complete_checkpoints, latest_checkpoint
from tests.helpers import base_config, torchrun, train_losses, write_config

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

TRAIN = {"max_steps": 8, "save_every": 2, "keep_last": 10, "lr": 5e-3}


def _run(tmp_path, shards, name: str, stage: int, save_async: bool, **kw):
    run_dir = tmp_path / name
    cfg = base_config(run_dir, shards, train={**TRAIN, "save_async": save_async}, zero={"stage": stage})
    return run_dir, torchrun(["pretrain", write_config(tmp_path / f"{name}.yaml", cfg)], **kw)


def _manifests(run_dir) -> dict[int, dict[str, str]]:
    out = {}
    for ref in complete_checkpoints(run_dir / "checkpoints"):
        sha = json.loads((ref.path / STATE_FILE).read_text())["sha256"]
        out[ref.step] = {name: h for name, h in sha.items() if name != "config.yaml"}  # says save_async
    return out


@pytest.mark.parametrize("stage", [2, 3])
def test_background_checkpoints_are_the_foreground_ones_byte_for_byte(tmp_path, shards, stage):
    fg_dir, _ = _run(tmp_path, shards, "foreground", stage, False)
    bg_dir, bg = _run(tmp_path, shards, "background", stage, True)
    # steps 2, 4 and 6 in the background (rank 0's log); the end save, step 8, before the run exits
    assert bg.stderr.count("writing it in the background") == 3, bg.stderr[-3000:]
    fg, bgm = _manifests(fg_dir), _manifests(bg_dir)
    assert sorted(bgm) == sorted(fg) == [2, 4, 6, 8]
    for step in fg:
        assert any(name.startswith("global_step") or "optim" in name for name in fg[step]), fg[step]
        assert bgm[step] == fg[step], f"step {step}"
    assert not list((bg_dir / "checkpoints").glob("*.partial"))
    assert train_losses(bg_dir) == train_losses(fg_dir)


def test_a_run_killed_while_training_on_from_a_background_save_resumes_exactly(tmp_path, shards):
    straight, _ = _run(tmp_path, shards, "straight", 3, True)
    run_dir, killed = _run(
        tmp_path, shards, "killed", 3, True, env={"DS_TRAIN_FAULT": "kill@step=7"}, check=False
    )
    assert killed.returncode != 0
    # step 6's save completes at the first step boundary after both ranks wrote it: by the start of step 7
    # on this tiny model, else step 4's is the latest; never a partial one
    assert latest_checkpoint(run_dir / "checkpoints").step in (4, 6)
    _run(tmp_path, shards, "killed", 3, True)
    a, b = train_losses(straight), train_losses(run_dir)
    for step in range(1, 9):
        assert b[step] == pytest.approx(a[step], rel=1e-6, abs=0), f"step {step}: {b[step]} vs {a[step]}"


def test_a_background_write_that_fails_stops_every_rank_with_one_line_and_keeps_the_last_checkpoint(
    tmp_path, shards
):
    # step 2's save completes; step 4's fails on rank 1 when it completes, steps later
    run_dir, proc = _run(
        tmp_path, shards, "full", 2, True, env={"DS_TRAIN_FAULT": "enospc@save=4,rank=1"}, check=False
    )
    assert proc.returncode != 0
    ours = [line for line in proc.stderr.splitlines() if line.startswith("ds-train: error:")]
    assert len(ours) == 2, proc.stderr[-6000:]  # both ranks, the same explanation
    for line in ours:
        assert "could not write checkpoint step_00000004 (rank 1: No space left on device" in line
        assert "checkpoints/step_00000002 is still the latest" in line
    assert latest_checkpoint(run_dir / "checkpoints").step == 2
