"""The offload checks made before any process group exists: NVMe offload on a machine that cannot
build DeepSpeed's async_io op, and resuming an NVMe-offloaded optimizer on another world size.
Both are one line on stderr, exit status 2, nothing written (the training itself:
tests/distributed/test_offload.py)."""

from __future__ import annotations

import json

import pytest
import torch.distributed as dist

from ds_train.checkpoint.nvme_optimizer import LAYOUT_KEY, elastic_resume_problem
from ds_train.cli import main
from ds_train.distributed.op_builds import offload_op_problem
from tests.helpers import base_config, state_only_checkpoint, write_config


@pytest.fixture
def no_libaio(monkeypatch):
    """DeepSpeed as it is on a machine without libaio's headers, whatever this one has."""
    import deepspeed.git_version_info
    import deepspeed.ops.op_builder

    class Incompatible:
        def is_compatible(self, verbose: bool = False) -> bool:
            return False

    monkeypatch.setattr(deepspeed.ops.op_builder, "AsyncIOBuilder", Incompatible)
    monkeypatch.setattr(deepspeed.git_version_info, "installed_ops", {"async_io": False})


def test_nvme_offload_needs_the_async_io_op(no_libaio):
    assert offload_op_problem("cpu", "cpu") is None and offload_op_problem("none", "none") is None
    for optimizer, param in (("nvme", "none"), ("cpu", "nvme"), ("nvme", "nvme")):
        assert "apt-get install libaio-dev" in offload_op_problem(optimizer, param)


def test_nvme_offload_without_libaio_is_one_line_before_any_work(tmp_path, shards, capsys, no_libaio):
    (tmp_path / "nvme").mkdir()
    cfg = write_config(tmp_path / "run.yaml", base_config(tmp_path / "run", shards))
    code = main(
        [
            "pretrain",
            str(cfg),
            "zero.preset=stage3-nvme",
            "zero.stage=3",
            f"zero.nvme_path={tmp_path / 'nvme'}",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("ds-train: error: NVMe offload") and "\n" not in err, err
    assert not dist.is_initialized() and not (tmp_path / "run").exists()


def test_nvme_optimizer_checkpoint_is_not_resumed_on_another_world_size():
    nvme_saved = {"world_size": 2, LAYOUT_KEY: [{"numel": 10, "swap_file": None}]}
    assert elastic_resume_problem(nvme_saved, 2, "nvme") is None  # same world size: restored as saved
    assert "Resume on 2 ranks" in elastic_resume_problem(nvme_saved, 1, "cpu")  # saved with NVMe
    assert "Resume on 2 ranks" in elastic_resume_problem({"world_size": 2}, 1, "nvme")  # resumed into NVMe
    assert elastic_resume_problem({"world_size": 2}, 1, "cpu") is None  # universal resume handles the rest
    universal = {"world_size": 2, "universal": True}  # `convert reshard`'s: loads on any world size...
    assert elastic_resume_problem(universal, 4, "cpu") is None
    assert "universal format" in elastic_resume_problem(universal, 2, "nvme")  # ...but not into NVMe


def test_no_universal_checkpoint_is_made_from_an_nvme_optimizer_checkpoint(tmp_path):
    from ds_train.convert.reshard import to_universal
    from ds_train.convert.zero_layout import CheckpointError

    tag = tmp_path / "step_00000004"
    tag.mkdir()
    (tag / "ds_train_state.json").write_text(json.dumps({"step": 4, "world_size": 2, LAYOUT_KEY: []}))
    with pytest.raises(CheckpointError, match="offloaded to NVMe"):
        to_universal(tag, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_elastic_refusal_reaches_the_user_as_one_line(tmp_path, shards, capsys, monkeypatch):
    cfg_file = write_config(tmp_path / "run.yaml", base_config(tmp_path / "run", shards))
    nvme = {LAYOUT_KEY: [{"numel": 10, "swap_file": "0_3.tensor.swp"}]}
    state_only_checkpoint(cfg_file, 4, world_size=2, global_batch_size=8, **nvme)
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    code = main(["pretrain", str(cfg_file), "zero.stage=3", "zero.offload_optimizer=cpu"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "saved by 2 ranks and this run has 1" in err and "\n" not in err, err
    assert not dist.is_initialized()
