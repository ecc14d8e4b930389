"""Fault handling that needs no process group: bad samples in shards, no pickle from shards or
checkpoints, checkpoint manifests (sizes + sha256) checked before loading, checkpoint saves that
fail cleanly, the non-finite loss message, resume mismatches, and the fault-injection spec.
The multi-process faults (a rank killed or hung, a crash inside a save) are in
tests/distributed/test_faults.py; docs/reliability.md maps each fault to its test."""

from __future__ import annotations

import errno
import json
import shutil
import tarfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ds_train.checkpoint.compat import check_data_resume, check_resume
from ds_train.checkpoint.deepspeed_io import safe_loading
from ds_train.checkpoint.integrity import manifest_problems
from ds_train.checkpoint.layout import LATEST, STATE_FILE, latest_checkpoint
from ds_train.checkpoint.manager import (
    CheckpointDamaged,
    CheckpointManager,
    CheckpointWriteError,
    share_of_files,
)
from ds_train.cli import main
from ds_train.config.loader import ConfigError
from ds_train.data.loader import build_plan
from ds_train.data.reader import RowReader
from ds_train.data.shard_format import write_shard
from ds_train.data.shard_set import DataError
from ds_train.distributed.launch_env import LaunchEnv
from ds_train.train.callbacks.fault_injection import Fault, parse
from ds_train.train.nonfinite import NonFiniteLossError
from ds_train.train.settings import TrainerSettings
from ds_train.train.trainer import Trainer
from tests.helpers import base_config, write_config


class Boom:
    """Unpickling this runs code: a marker file appears if anything ever unpickles it."""

    marker: Path

    def __reduce__(self):
        return (Path.touch, (self.marker,))


# --- data: samples of the wrong dtype or length, pickled members --------------------------------


def _replace_shard(shards: Path, tmp_path: Path, index: int, rows: np.ndarray) -> tuple[Path, str]:
    """A copy of the train shard set whose shard `index` holds `rows` instead."""
    out = tmp_path / "train"
    shutil.copytree(shards / "train", out)
    name = json.loads((out / "index.json").read_text())["shards"][index]["name"]
    write_shard(out, name, rows, [[0]] * len(rows), rows_per_member=len(rows))
    return out, name


def _read_shard(spec: Path, index: int, **kw):
    plan = build_plan(str(spec), seed=3, shuffle=False, window=1)
    n = int(plan.sources[0].rows[index])
    return RowReader(plan.sources, None, **kw).read(np.zeros(n, np.int64), np.full(n, index), np.arange(n))


@pytest.mark.parametrize(
    ("bad", "expected"),
    [
        (np.zeros((300, 33), np.uint32), r"holds uint32\[300, 33\], expected uint16\[rows, 33\]"),
        (np.zeros((300, 32), np.uint16), r"holds uint16\[300, 32\], expected uint16\[rows, 33\]"),
    ],
    ids=["wrong-dtype", "wrong-length"],
)
def test_sample_of_the_wrong_dtype_or_length_names_shard_member_and_byte(shards, tmp_path, bad, expected):
    spec, name = _replace_shard(shards, tmp_path, 1, bad)
    with pytest.raises(DataError, match=rf"{name}: member \S+ at byte \d+ {expected}"):
        _read_shard(spec, 1)
    _, lost = _read_shard(spec, 1, skip_corrupt=True)  # opted in: every row of it flagged, none read
    assert lost.all()


def test_a_pickled_shard_member_is_refused_without_unpickling(shards, tmp_path):
    spec, name = _replace_shard(shards, tmp_path, 0, np.zeros((300, 33), np.uint16))
    Boom.marker = tmp_path / "unpickled"
    evil = np.empty(2, dtype=object)
    evil[:] = [Boom(), Boom()]
    npy = tmp_path / "x.tokens.npy"
    np.save(npy, evil, allow_pickle=True)
    with tarfile.open(spec / name, "w") as tf:
        tf.add(npy, arcname="evil-00000.tokens.npy")
    with pytest.raises(DataError, match=rf"{name}: member evil-00000.tokens.npy at byte \d+ is not a valid"):
        _read_shard(spec, 0)
    assert not Boom.marker.exists()


# --- checkpoints: manifests, safe loading ------------------------------------------------------


class _Writer:
    """DeepSpeed's checkpoint_engine interface (save/load), writing with torch.save."""

    def save(self, state_dict, path):
        torch.save(state_dict, path)

    def load(self, path, map_location=None):
        return torch.load(path, map_location=map_location, weights_only=False)


class _Engine:
    """Enough of a DeepSpeed engine for CheckpointManager: one rank file per save."""

    def __init__(self, fail: OSError | None = None, writer=None):
        self.checkpoint_engine = writer or _Writer()
        self.fail = fail

    def save_checkpoint(self, root, tag, client_state, save_latest):
        (Path(root) / tag).mkdir(parents=True, exist_ok=True)
        if self.fail is not None:
            raise self.fail
        self.checkpoint_engine.save({"w": torch.arange(1000.0)}, str(Path(root) / tag / "model_states.pt"))


def _ctx():
    return SimpleNamespace(rank=0, world_size=1, is_main=True, launch=LaunchEnv("none", 0, 0, 1, 1, "x", 1))


CONFIG_YAML = "run: {}\n"


def _saved(tmp_path: Path) -> tuple[CheckpointManager, Path]:
    manager = CheckpointManager(tmp_path / "run", _ctx(), keep_last=3)
    manager.save(
        _Engine(), 4, {"consumed_samples": 32}, CONFIG_YAML, lambda d: (d / "extra.json").write_text("{}")
    )
    return manager, manager.root / "step_00000004"


def test_a_ride_along_file_failing_fails_the_save_like_a_write_error(tmp_path):
    """Rank 0 completes a checkpoint alone (ride-along files, manifest, rename): any error there is
    shared with every rank through the save's last all-gather, as a write error is, instead of
    leaving the other ranks waiting for it until the collective timeout."""
    manager = CheckpointManager(tmp_path / "run", _ctx(), keep_last=3)

    def failing_extras(directory):
        raise ValueError("tokenizer cannot be saved")

    with pytest.raises(CheckpointWriteError, match="rank 0: tokenizer cannot be saved"):
        manager.save(_Engine(), 4, {}, CONFIG_YAML, failing_extras)
    assert latest_checkpoint(manager.root) is None


def test_save_records_size_and_sha256_of_every_file_and_damage_is_named(tmp_path):
    manager, ckpt = _saved(tmp_path)
    state = json.loads((ckpt / STATE_FILE).read_text())
    on_disk = sorted(
        str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if p.is_file() and p.name != STATE_FILE
    )
    assert sorted(state["files"]) == sorted(state["sha256"]) == on_disk  # rank files, rng, config, extras
    assert {"model_states.pt", "rng/rank_00000.pt", "config.yaml", "extra.json"} <= set(on_disk)
    assert manifest_problems(ckpt, state) == []
    manager.verify(latest_checkpoint(manager.root), state)  # passes

    data = bytearray((ckpt / "model_states.pt").read_bytes())
    data[-100] ^= 0xFF  # same size, other bytes: only the checksum sees it
    (ckpt / "model_states.pt").write_bytes(bytes(data))
    assert manifest_problems(ckpt, state, checksums=False) == []
    assert manifest_problems(ckpt, state) == ["model_states.pt does not match its sha256 in the manifest"]
    with pytest.raises(CheckpointDamaged, match=r"model_states.pt does not match its sha256.*refusing"):
        manager.verify(latest_checkpoint(manager.root), state)
    (ckpt / "config.yaml").write_text("x")
    (ckpt / "extra.json").unlink()
    problems = manifest_problems(ckpt, state, checksums=False)
    assert problems == [
        f"config.yaml has 1 bytes, the manifest says {len(CONFIG_YAML)}",
        "extra.json is missing",
    ]


def _deepspeed_writer():
    """DeepSpeed's default checkpoint writer as a real engine configures it (zip serialization)."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    writer = TorchCheckpointEngine(None)
    writer.zipfile_serialization = True
    return writer


@pytest.mark.parametrize(
    "streamed", [True, False], ids=["deepspeed-writer-hashed-while-written", "other-writer"]
)
def test_checkpoint_files_are_hashed_while_written_and_the_manifest_matches_the_disk(
    tmp_path, monkeypatch, streamed
):
    import ds_train.checkpoint.manager as manager_module
    from ds_train.checksum import file_sha256

    read_back = []
    real_digest = manager_module.digest
    monkeypatch.setattr(manager_module, "digest", lambda p: read_back.append(Path(p).name) or real_digest(p))
    engine = _Engine(writer=_deepspeed_writer() if streamed else None)
    manager = CheckpointManager(tmp_path / "run", _ctx(), keep_last=3)
    manager.save(engine, 4, {}, CONFIG_YAML)
    ckpt = manager.root / "step_00000004"
    state = json.loads((ckpt / STATE_FILE).read_text())
    for name, sha in state["sha256"].items():
        assert file_sha256(ckpt / name) == sha, name
        assert (ckpt / name).stat().st_size == state["files"][name], name
    # DeepSpeed's default writer's file is hashed on its way out, never read back; others are.
    assert ("model_states.pt" in read_back) is not streamed
    loaded = torch.load(ckpt / "model_states.pt", weights_only=True)
    assert torch.equal(loaded["w"], torch.arange(1000.0))


def test_hashing_writer_hashes_what_it_writes_small_large_and_typed_buffers(tmp_path):
    import hashlib

    from ds_train.checksum import HashingWriter, file_sha256

    chunks = [b"header", np.random.default_rng(0).bytes(3 << 20), np.arange(300_000, dtype=np.float32), b""]
    with open(tmp_path / "f", "wb") as raw, HashingWriter(raw, overlap=True) as sink:
        for c in chunks:  # the 3 MiB and 1.2 MB writes are hashed in the helper thread
            sink.write(c)
    whole = b"".join(memoryview(c).cast("B").tobytes() for c in chunks)
    assert sink.size == len(whole) == (tmp_path / "f").stat().st_size
    assert sink.hexdigest() == hashlib.sha256(whole).hexdigest() == file_sha256(tmp_path / "f")


def test_checkpoint_verification_splits_the_bytes_evenly_across_ranks():
    sizes = {"optim_0": 900, "optim_1": 900, "model": 1000, "rng_0": 1, "rng_1": 1, "config.yaml": 2}
    shares = [share_of_files(sizes, r, 2) for r in range(2)]
    assert sorted(shares[0] + shares[1]) == sorted(sizes)  # every file once
    loads = [sum(sizes[n] for n in share) for share in shares]
    assert max(loads) == 1800  # split by name (every other file), rank 1 would read model + optim_1: 1901
    assert share_of_files(sizes, 0, 2) == shares[0]  # every rank computes the same split
    assert share_of_files(sizes, 0, 1) == sorted(sizes, key=lambda n: (-sizes[n], n))


def test_resume_refuses_a_damaged_checkpoint_in_one_line_before_starting(tmp_path, shards, capsys):
    import torch.distributed as dist

    _, ckpt = _saved(tmp_path)
    cfg = write_config(tmp_path / "run.yaml", base_config(tmp_path / "run", shards))
    with open(ckpt / "model_states.pt", "r+b") as fh:
        fh.truncate(100)
    assert main(["pretrain", str(cfg)]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert "is damaged (model_states.pt has 100 bytes, the manifest says" in err, err
    assert not dist.is_initialized()


def test_checkpoint_files_are_never_unpickled_beyond_the_allow_list(tmp_path):
    from deepspeed.runtime.fp16.loss_scaler import LossScaler

    Boom.marker = tmp_path / "unpickled"
    engine = _Engine()
    torch.save({"module": {"w": torch.ones(3)}, "scaler": LossScaler(1.0)}, tmp_path / "good.pt")
    torch.save({"module": {"w": torch.ones(3)}, "payload": Boom()}, tmp_path / "evil.pt")
    with safe_loading(engine):
        good = engine.checkpoint_engine.load(str(tmp_path / "good.pt"), map_location="cpu")
        assert isinstance(good["scaler"], LossScaler) and torch.equal(good["module"]["w"], torch.ones(3))
        with pytest.raises(CheckpointDamaged, match=r"evil.pt: refused to load .*weights_only=True"):
            engine.checkpoint_engine.load(str(tmp_path / "evil.pt"), map_location="cpu")
    assert not Boom.marker.exists()
    assert "load" not in vars(engine.checkpoint_engine)  # the reader is restored afterwards


@pytest.mark.parametrize("where", ["prepare", "deepspeed", "after-write", "free-space"])
def test_a_failed_save_is_one_error_and_the_previous_checkpoint_stays_latest(tmp_path, monkeypatch, where):
    manager, first = _saved(tmp_path)
    engine, hook = _Engine(), None
    if where == "prepare":  # the directory cannot be written: here, a file stands where a save goes
        (manager.root / "step_00000008").write_text("not a directory")
    elif where == "deepspeed":
        engine = _Engine(fail=OSError(errno.ENOSPC, "No space left on device", "model_states.pt"))
    elif where == "after-write":

        def hook(directory):
            raise OSError(errno.ENOSPC, "No space left on device", str(directory))

    else:
        monkeypatch.setattr(
            shutil, "disk_usage", lambda p: SimpleNamespace(total=10**9, used=10**9, free=1000)
        )
    with pytest.raises(CheckpointWriteError) as info:
        manager.save(engine, 8, {}, "run: {}\n", on_written=hook)
    message = str(info.value)
    assert "\n" not in message and "could not write checkpoint step_00000008 (rank 0: " in message
    assert f"{first} is still the latest" in message
    assert {"free-space": "free on the file system", "prepare": "Not a directory"}.get(
        where, "No space left"
    ) in message
    assert latest_checkpoint(manager.root).path == first
    assert (manager.root / LATEST).read_text() == "step_00000004"
    assert manifest_problems(first, json.loads((first / STATE_FILE).read_text())) == []
    if where == "free-space":  # refused before writing anything
        assert not list(manager.root.glob("step_00000008*"))


# --- non-finite loss ---------------------------------------------------------------------------


def _trainer(tmp_path, policy: str, rank: int = 1) -> Trainer:
    ctx = SimpleNamespace(rank=rank, world_size=2, is_main=rank == 0, device=torch.device("cpu"))
    return Trainer(
        settings=TrainerSettings(10, 1, 0, 0, 1, 32, nonfinite=policy, max_nonfinite=2),
        ctx=ctx,
        engine=None,
        objective=None,
        layout=None,
        train_batches=[],
        checkpoints=SimpleNamespace(root=tmp_path, pending=None, writing=lambda: False),
        state_fn=dict,
        config_yaml="",
        start_step=5,
        describe_sample=lambda src, shard, row: f"shards/train-{shard:06d}.tar row {row}",
    )


def _micro(first_id: int) -> dict:
    return {
        "sample_ids": torch.tensor([first_id, first_id + 1]),
        "source": torch.tensor([0, 0]),
        "shard": torch.tensor([3, 1]),
        "row": torch.tensor([17, 250]),
    }


def test_nonfinite_loss_names_step_rank_micro_batch_and_samples(tmp_path, caplog):
    micro = [_micro(40), _micro(42)]
    t = _trainer(tmp_path, "stop")
    with pytest.raises(NonFiniteLossError) as info:
        t.nonfinite.seen(t.step, micro, torch.tensor([1.0, float("inf")]))
    assert str(info.value) == (
        "non-finite loss in step 5 on rank 1, micro-batch 1 (global samples 42..43: "
        "shards/train-000003.tar row 17, shards/train-000001.tar row 250); stopping: "
        "train.nonfinite=stop; no checkpoint was written"
    )
    t = _trainer(tmp_path, "skip")
    with caplog.at_level("WARNING"):
        t.nonfinite.seen(t.step, micro, torch.tensor([float("nan"), 1.0]))
    assert "micro-batch 0 (global samples 40..41" in caplog.text and "update skipped" in caplog.text
    assert t.nonfinite.steps == 1
    with pytest.raises(NonFiniteLossError, match="2 consecutive non-finite steps"):
        t.nonfinite.seen(t.step, micro, torch.tensor([float("nan"), 1.0]))
    # a rank whose own losses were finite says so rather than naming its (innocent) samples
    t = _trainer(tmp_path, "stop", rank=0)
    with pytest.raises(NonFiniteLossError, match="in step 5 on another rank"):
        t.nonfinite.seen(t.step, micro, torch.tensor([1.0, 2.0]))


# --- resume mismatches -------------------------------------------------------------------------


STATE = {
    "step": 5,
    "consumed_samples": 40,
    "model_config": {"hidden_size": 32},
    "tokenizer_sha256": "aaa",
    "objective": "causal_lm",
    "global_batch_size": 8,
    "data": {"seq_len": 32, "seed": 7, "fingerprint": "f1", "order": {"shuffle": True, "window": 16}},
}


def _resume(force=False, **now):
    args = {
        "model_sig": {"hidden_size": 32},
        "tokenizer_sha": "aaa",
        "objective": "causal_lm",
        "decay_embeddings": True,
    }
    args.update({k: v for k, v in now.items() if k in args})
    check_resume(STATE, where="run", global_batch_size=now.get("gbs", 8), force=force, **args)
    data = {"fingerprint_now": "f1", "seq_len": 32, "seed": 7, "order": {"shuffle": True, "window": 16}}
    data.update({k: v for k, v in now.items() if k in data})
    check_data_resume(STATE, where="run", force=force, **data)


@pytest.mark.parametrize(
    ("now", "expected", "forceable"),
    [
        ({"model_sig": {"hidden_size": 64}}, "a different model (hidden_size: 32 → 64)", False),
        ({"tokenizer_sha": "bbb"}, "a different tokenizer", False),
        ({"objective": "masked_lm"}, "objective causal_lm (this run: masked_lm)", False),
        (  # a checkpoint that does not say decayed its embeddings (the only choice before)
            {"decay_embeddings": False},
            "train.embedding_weight_decay=true (this run: false), which sets the optimizer's parameter groups",
            False,
        ),
        (
            {"gbs": 16},  # forced, the stream continues at the checkpoint's position (stream_origin.py)
            "train.global_batch_size=8 (this run: 16), which changes the samples per step of the schedule",
            True,
        ),
        ({"seq_len": 64}, "seq_len 32 (shards now: 64)", True),
        ({"seed": 8}, "data seed 7 (now 8), which fixes the data order", True),
        ({"fingerprint_now": "f2"}, "a different shard set", True),
        (
            {"order": {"shuffle": True, "window": 4}},
            "data.shuffle=true, data.shuffle_window=16 (now data.shuffle=true, data.shuffle_window=4)",
            True,
        ),
        (
            {"order": {"shuffle": False, "window": 1}},
            "(now data.shuffle=false), which fix the data order",
            True,
        ),
    ],
    ids=[
        "model",
        "tokenizer",
        "objective",
        "embedding-decay",
        "global-batch",
        "seq-len",
        "seed",
        "shard-set",
        "window",
        "shuffle",
    ],
)
def test_resume_mismatch_says_what_differs_and_force_only_waives_the_data(now, expected, forceable):
    _resume()  # the same run resumes
    with pytest.raises(ConfigError) as info:
        _resume(**now)
    assert expected in str(info.value) and "\n" not in str(info.value)
    assert ("run.force_resume=true" in str(info.value)) == forceable
    if "seed" in now:  # the way back named: the seed, not other shards
        assert "set data.seed=7, or start" in str(info.value) and "original shards" not in str(info.value)
    if "order" in now:  # ...and for the order, the settings
        assert "; set data.shuffle=true, data.shuffle_window=16, or start" in str(info.value), str(info.value)
    if forceable:
        _resume(force=True, **now)
    else:
        with pytest.raises(ConfigError, match=expected.split(" (")[0]):
            _resume(force=True, **now)


# --- the fault-injection spec ------------------------------------------------------------------


def test_fault_spec_parses_points_ranks_and_lists():
    assert parse("kill@step=7") == [Fault("kill", "step", 7, None)]
    assert parse("kill@save=8,rank=1; nan@step=3") == [
        Fault("kill", "save", 8, 1),
        Fault("nan", "step", 3, None),
    ]
    assert parse("slow@step=2,rank=1,ms=250") == [Fault("slow", "step", 2, 1, 250)]
    assert parse("spike@step=9,x=200") == [Fault("spike", "step", 9, None, factor=200.0)]
    assert parse("spike@step=9")[0].factor == 100.0
    assert Fault("enospc", "save", 8, 1).fires("save", 8, 1) and not Fault("enospc", "save", 8, 1).fires(
        "save", 8, 0
    )
    for bad in ("kill", "nan@save=3", "explode@step=1"):
        with pytest.raises(ValueError, match="cannot parse"):
            parse(bad)


def test_a_data_error_in_a_loader_worker_is_one_line_naming_the_shard(shards, tmp_path):
    from ds_train.data.loader import MicroBatches, make_loader
    from ds_train.distributed.deepspeed_config import BatchLayout
    from ds_train.objectives.causal_lm import CausalLM

    spec, name = _replace_shard(shards, tmp_path, 0, np.zeros((300, 33), np.uint32))
    plan = build_plan(str(spec), seed=3, shuffle=False, window=1)
    loader = make_loader(
        MicroBatches(plan, BatchLayout(8, 8, 1, 1), 0, 0, CausalLM(eos_id=0, pad_id=1), None),
        num_workers=1,
        prefetch_factor=1,
    )
    with pytest.raises(DataError) as info:
        next(iter(loader))
    assert "\n" not in str(info.value) and str(info.value).startswith(f"shard {spec / name}: member ")


def test_checkpoints_record_what_decides_the_order(shards):
    """data.shuffle and data.shuffle_window decide the stream as much as the seed does: recorded,
    so a resume that changes them is refused (the table above) instead of repeating or skipping rows."""
    assert build_plan(str(shards / "train"), seed=1, shuffle=True, window=4).state(0)["order"] == {
        "shuffle": True,
        "window": 4,
    }
    unshuffled = build_plan(str(shards / "train"), seed=1, shuffle=False, window=4)
    assert unshuffled.state(0)["order"] == {"shuffle": False, "window": 1}  # the window then does nothing
