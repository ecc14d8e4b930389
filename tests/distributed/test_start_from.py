"""run.start_from on 2 gloo ranks: a branch off another run's checkpoint trains on exactly as that
run did, writes only under its own directory, resumes from its own checkpoints once it has them,
and branches onto another world size and another LR schedule."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ds_train.checkpoint.layout import latest_checkpoint
from tests.helpers import (
    base_config,
    file_digests,
    read_metrics,
    run_cli,
    torchrun,
    train_losses,
    write_config,
)

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

TRAIN = {"max_steps": 8, "save_every": 4, "keep_last": 5, "lr": 5e-3, "schedule": "cosine"}


@pytest.fixture(scope="module")
def parent(tmp_path_factory, shards):
    """An 8-step 2-rank ZeRO-2 run with checkpoints at steps 4 and 8."""
    tmp = tmp_path_factory.mktemp("parent")
    cfg = write_config(tmp / "parent.yaml", base_config(tmp / "parent", shards, train=TRAIN))
    torchrun(["pretrain", cfg])
    return tmp / "parent"


def test_branch_continues_exactly_and_resumes_from_its_own(tmp_path, shards, parent):
    before = file_digests(parent)
    branch = tmp_path / "branch"
    start = str(parent / "checkpoints" / "step_00000004")
    cfg = write_config(
        tmp_path / "branch.yaml", base_config(branch, shards, train=TRAIN, run={"start_from": start})
    )
    torchrun(["pretrain", cfg])
    a, b = train_losses(parent), train_losses(branch)
    assert sorted(b) == [5, 6, 7, 8]  # it starts at the branch point
    for step in (5, 6, 7, 8):  # weights, Adam moments, LR position and data position all carried over
        assert b[step] == pytest.approx(a[step], rel=1e-6, abs=0), f"step {step}: {b[step]} vs {a[step]}"
    assert file_digests(parent) == before  # the other run's directory is only read
    ref = latest_checkpoint(branch / "checkpoints")
    assert ref.step == 8
    (entry,) = ref.state()["lineage"]
    assert entry["step"] == 4 and entry["checkpoint"] == str(Path(start).resolve())
    assert json.loads((branch / "lineage.json").read_text()) == {"start_from": start, "lineage": [entry]}

    # the same command with more steps (a requeue, say) resumes from the branch's own step 8
    more = write_config(
        tmp_path / "more.yaml",
        base_config(branch, shards, train={**TRAIN, "max_steps": 10}, run={"start_from": start}),
    )
    torchrun(["pretrain", more])
    steps = [r["step"] for r in read_metrics(branch) if "loss" in r]
    assert steps == [5, 6, 7, 8, 9, 10]
    assert latest_checkpoint(branch / "checkpoints").state()["lineage"] == [entry]
    report = run_cli(["report", str(branch)])
    assert f"branched off {Path(start).resolve()} (step 4)" in report.stdout


def test_branch_on_one_rank_with_a_decay_schedule(tmp_path, shards, parent):
    """A WSD-style decay taken from the parent's last checkpoint on another world size: DeepSpeed's
    universal conversion goes under the branch's checkpoints/, and the schedule is the branch's."""
    before = file_digests(parent)
    branch = tmp_path / "decay"
    train = {
        **TRAIN,
        "max_steps": 12,
        "schedule": "wsd",
        "decay_steps": 4,
        "save_every": 0,
        "export_hf_every": 1,
    }
    cfg = write_config(
        tmp_path / "decay.yaml",
        base_config(branch, shards, train=train, run={"start_from": str(parent)}),
    )
    proc = torchrun(["pretrain", cfg], nproc=1)
    assert file_digests(parent) == before and not list(parent.rglob("*.universal"))
    # the periodic export takes the branch's own checkpoints only: the branch point is not one
    assert sorted(p.name for p in (branch / "exports").iterdir()) == ["step_00000012"]
    assert "background export exited" not in proc.stderr
    records = {r["step"]: r for r in read_metrics(branch) if "loss" in r}
    assert sorted(records) == [9, 10, 11, 12]
    # the loaded weights go on from the parent's loss, far below a fresh model's
    a = train_losses(parent)
    assert records[9]["loss"] < 0.5 * (a[1] + a[8])
    assert records[9]["loss"] == pytest.approx(a[8], rel=0.15)
    # the branch's WSD cooldown over steps 9-12 from the full lr (a cosine over 12 steps would be
    # below 30% of it by step 9)
    lrs = [records[s]["lr"] for s in (9, 10, 11, 12)]
    assert lrs[0] > 0.5 * TRAIN["lr"] and lrs == sorted(lrs, reverse=True) and lrs[-1] < 0.5 * lrs[0]
    ref = latest_checkpoint(branch / "checkpoints")
    assert ref.step == 12 and ref.state()["world_size"] == 1
    assert not list((branch / "checkpoints").glob("*.universal"))  # removed once the branch saved
