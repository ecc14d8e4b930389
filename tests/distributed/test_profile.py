"""`profile.*` in a real 2-rank run: the selected rank, and only it, records exactly the configured
steps, with DeepSpeed's gradient reduction inside them, and training goes on after the window."""

from __future__ import annotations

import json

import pytest

from ds_train.train.trace_summary import load_trace
from tests.helpers import base_config, torchrun, train_losses, write_config

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def test_profiles_the_selected_rank_for_the_configured_steps(tmp_path, shards):
    run = tmp_path / "run"
    cfg = base_config(
        run,
        shards,
        train={"max_steps": 5, "log_every": 1},
        profile={"start_step": 3, "steps": 2, "warmup_steps": 1, "ranks": [1]},
    )
    torchrun(["pretrain", write_config(tmp_path / "run.yaml", cfg)])
    window = run / "profile" / "steps_3-4"
    assert sorted(p.name for p in window.iterdir()) == [
        "rank1.ops.txt",
        "rank1.pt.trace.json.gz",
        "rank1.summary.json",
    ]
    events = load_trace(window / "rank1.pt.trace.json.gz")
    labels = sorted(e["name"] for e in events if e.get("name", "").startswith("ProfilerStep#"))
    assert labels == ["ProfilerStep#3", "ProfilerStep#4"]
    names = {e.get("name", "") for e in events}
    assert "aten::mm" in names
    assert "gloo:all_gather" in names  # ZeRO-2 gathering the updated parameter partitions
    assert json.loads((window / "rank1.summary.json").read_text())["steps"] == [3, 4]
    assert sorted(train_losses(run)) == [1, 2, 3, 4, 5]  # training went on past the window
