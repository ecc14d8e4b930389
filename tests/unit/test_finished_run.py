"""Starting a run that is already at train.max_steps on another number of ranks: nothing to train,
so it ends at once, without converting its checkpoint to the universal format (a full fp32 copy
with Adam moments that nothing would use or remove)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch.distributed as dist

from ds_train.checkpoint.layout import CheckpointRef
from ds_train.cli import main
from ds_train.config import load_config
from ds_train.train.session import nothing_to_train
from tests.helpers import base_config, state_only_checkpoint, write_config


@pytest.fixture
def finished_two_rank_run(tmp_path, shards):
    """A run directory whose latest checkpoint is step 4 of a 2-rank ZeRO-3 run (state file only)."""
    cfg_file = write_config(tmp_path / "run.yaml", base_config(tmp_path / "run", shards))
    ckpt = state_only_checkpoint(cfg_file, 4, world_size=2, zero_stage=3, global_batch_size=8)
    return cfg_file, ckpt


def test_which_starts_have_nothing_to_do(finished_two_rank_run):
    cfg_file, ckpt = finished_two_rank_run
    ref = CheckpointRef(ckpt.parent, ckpt.name)

    def note(max_steps: int, world_size: int, ref=ref):
        cfg = load_config(cfg_file, [f"train.max_steps={max_steps}"])
        return nothing_to_train(
            cfg, SimpleNamespace(resume_from=ref, launch=SimpleNamespace(world_size=world_size))
        )

    assert "nothing to train on 1 rank(s)" in note(4, 1)
    assert "is beyond train.max_steps=3" in note(3, 2)  # lowered below the checkpoint: on any world size
    assert note(8, 1) is None  # more steps to train: resumed through the universal format
    assert note(4, 2) is None  # its own world size: loads as saved (completes a lost final export)
    state = json.loads((ckpt / "ds_train_state.json").read_text())
    (ckpt / "ds_train_state.json").write_text(json.dumps({**state, "zero_stage": 0}))
    assert note(4, 1) is None  # ZeRO-0 checkpoints load on any world size as they are


def test_finished_run_on_other_ranks_ends_before_any_work(finished_two_rank_run, caplog, monkeypatch):
    cfg_file, ckpt = finished_two_rank_run
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    code = main(["pretrain", str(cfg_file), "train.max_steps=4", "zero.stage=3"])
    assert code == 0 and "is finished" in caplog.text and "Raise train.max_steps" in caplog.text
    assert not dist.is_initialized()  # no process group, no engine
    assert not list(ckpt.parent.glob("*.universal"))
