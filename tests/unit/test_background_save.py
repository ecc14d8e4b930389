"""train.save_async: the host snapshot is the step's state and writes the same bytes, the writer
thread reports its errors, and a background save completes only once its files are written."""

from __future__ import annotations

import io
import json
import threading
from collections import OrderedDict, defaultdict, namedtuple
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from ds_train.checkpoint.background import BackgroundWriter, HostMemory, host_snapshot
from ds_train.checkpoint.layout import STATE_FILE, complete_checkpoints, latest_checkpoint
from ds_train.checkpoint.manager import CheckpointManager, CheckpointWriteError
from ds_train.checksum import file_sha256
from ds_train.distributed.launch_env import LaunchEnv

Shape = namedtuple("Shape", "rows cols")


def _saved_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _state() -> dict:
    flat = torch.arange(12.0)  # a DeepSpeed-style flat buffer and views into it
    flat.ds_id = 5  # DeepSpeed tags its flat partitions; torch.save writes the attribute
    placeholders = [torch.empty(0), torch.empty(0)]  # ZeRO-3's partitioned parameters: no bytes
    tied = torch.nn.Parameter(torch.randn(4, 3))
    betas, steps = (0.9, 0.95), torch.tensor(3.0)  # objects met twice: pickle writes them once
    return {
        "param_groups": [{"betas": betas, "step": steps}, {"betas": betas, "step": steps}],
        "module": OrderedDict(embed=tied.detach(), head=tied.detach(), norm=torch.ones(3)),
        "partitions": [flat[:6].view(2, 3), flat[6:], flat],
        "placeholders": placeholders,
        "param": tied,
        "state": defaultdict(dict, {0: {"exp_avg": torch.zeros(3), "step": 7}}),
        "shape": Shape(4, 3),
        "scaler": SimpleNamespace(cur_scale=[65536.0]),
        "int8": torch.tensor([1, 2, 3], dtype=torch.int8),
        "version": "0.19.8",
    }


def test_host_snapshot_writes_the_same_bytes_and_keeps_shared_storage_shared():
    state = _state()
    snap = host_snapshot(state)
    # torch.save of a copy that lost sharing would write the tied weight twice, and each view of
    # the flat buffer as its own storage: other bytes
    assert _saved_bytes(snap) == _saved_bytes(state)
    m = snap["module"]
    assert m["embed"].untyped_storage().data_ptr() == m["head"].untyped_storage().data_ptr()
    assert (
        snap["partitions"][0].untyped_storage().data_ptr()
        == snap["partitions"][1].untyped_storage().data_ptr()
    )
    assert m["embed"].untyped_storage().data_ptr() != state["module"]["embed"].untyped_storage().data_ptr()
    assert type(snap["module"]) is OrderedDict and type(snap["state"]) is defaultdict
    assert snap["shape"] == (4, 3) and snap["shape"].cols == 3
    assert isinstance(snap["param"], torch.nn.Parameter) and snap["param"].requires_grad
    assert snap["partitions"][2].ds_id == 5


def test_host_snapshot_is_not_changed_by_training_that_goes_on():
    state = _state()
    before = _saved_bytes(state)
    snap = host_snapshot(state)
    with torch.no_grad():  # what the next optimizer steps do: in place
        state["module"]["embed"].add_(1.0)
        state["partitions"][1].mul_(3.0)
        state["state"][0]["exp_avg"].add_(0.5)
        state["param"].sub_(2.0)
    state["state"][0]["step"] = 8
    state["scaler"].cur_scale[0] = 1.0
    assert _saved_bytes(state) != before
    assert _saved_bytes(snap) == before


def _storage_ptrs(obj) -> set[int]:
    """The host addresses of every tensor's storage in a snapshot (empty ones have none)."""
    if isinstance(obj, torch.Tensor):
        return {obj.untyped_storage().data_ptr()} - {0}
    values = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, list | tuple) else []
    return set().union(*(_storage_ptrs(v) for v in values))


def test_kept_host_memory_is_reused_by_the_next_snapshot_only_after_release():
    memory, state = HostMemory(), _state()
    first = host_snapshot(state, memory=memory)
    first_bytes = _saved_bytes(first)
    assert first_bytes == _saved_bytes(state)
    with torch.no_grad():
        state["module"]["embed"].add_(1.0)
        state["partitions"][2].mul_(3.0)
    # the first copy is still being written: the next snapshot must not take its memory
    second = host_snapshot(state, memory=memory)
    assert not _storage_ptrs(first) & _storage_ptrs(second)
    assert _saved_bytes(first) == first_bytes and _saved_bytes(second) == _saved_bytes(state)
    memory.release()  # both copies' writes are done
    with torch.no_grad():
        state["param"].sub_(2.0)
        state["state"][0]["exp_avg"].add_(0.5)
    third = host_snapshot(state, memory=memory)
    # kept memory, holding the new values: the bytes torch.save writes of the state now
    assert _storage_ptrs(third) <= _storage_ptrs(first) | _storage_ptrs(second)
    assert _saved_bytes(third) == _saved_bytes(state)
    memory.release()  # what the third copy did not take is freed
    one_copy = HostMemory()
    host_snapshot(state, memory=one_copy)
    one_copy.release()
    assert memory.kept_bytes() == one_copy.kept_bytes() > 0


def test_host_memory_not_kept_is_freed_at_release():
    memory = HostMemory(keep=False)
    host_snapshot(_state(), memory=memory)
    memory.release()
    assert memory.kept_bytes() == 0


def test_background_writer_runs_jobs_in_order_says_when_busy_and_returns_the_first_error():
    release, order = threading.Event(), []
    writer = BackgroundWriter()
    writer.submit(lambda: release.wait(10) and order.append(1))
    writer.submit(lambda: order.append(2))
    writer.submit(lambda: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    writer.submit(lambda: (_ for _ in ()).throw(RuntimeError("later")))
    assert writer.busy()
    release.set()
    error = writer.wait()
    assert isinstance(error, OSError) and error.errno == 28
    assert order == [1, 2] and not writer.busy()


class _HeldWriter:
    """DeepSpeed's default writer (torch.save to a zip), held at each save until `go` is set."""

    zipfile_serialization = True

    def __init__(self, fail: Exception | None = None):
        self.go, self.fail = threading.Event(), fail

    def save(self, state_dict, path):
        assert self.go.wait(10)
        if self.fail is not None:
            raise self.fail
        torch.save(state_dict, path)


class _Engine:
    """A one-rank engine whose weights training changes in place after each save."""

    def __init__(self, writer):
        self.checkpoint_engine = writer
        self.w = torch.arange(1000.0)

    def save_checkpoint(self, root, tag, client_state, save_latest):
        (Path(root) / tag).mkdir(parents=True, exist_ok=True)
        self.checkpoint_engine.save({"w": self.w}, str(Path(root) / tag / "model_states.pt"))


@pytest.fixture
def plain_writer(monkeypatch):
    """Let _HeldWriter pass for DeepSpeed's TorchCheckpointEngine (the only writer saved async)."""
    import ds_train.checkpoint.deepspeed_io as deepspeed_io
    import ds_train.checkpoint.manager as manager_module

    def plain(engine):
        return isinstance(engine.checkpoint_engine, _HeldWriter)

    monkeypatch.setattr(manager_module, "is_plain_torch_writer", plain)
    monkeypatch.setattr(deepspeed_io, "is_plain_torch_writer", plain)


def _manager(tmp_path: Path) -> CheckpointManager:
    ctx = SimpleNamespace(rank=0, world_size=1, is_main=True, launch=LaunchEnv("none", 0, 0, 1, 1, "x", 1))
    return CheckpointManager(tmp_path / "run", ctx, keep_last=3)


def test_a_background_save_completes_only_after_its_files_are_written_with_the_saved_steps_state(
    tmp_path, plain_writer
):
    manager, writer = _manager(tmp_path), _HeldWriter()
    engine = _Engine(writer)
    written = []
    assert (
        manager.save(engine, 4, {"consumed": 32}, "run: {}\n", on_written=written.append, background=True)
        is None
    )
    assert manager.writing() and latest_checkpoint(manager.root) is None and not written
    assert (manager.root / "step_00000004.partial").is_dir()
    engine.w.add_(1.0)  # training goes on while the file is written
    writer.go.set()
    ref = manager.finish()
    assert ref is not None and ref.step == 4 and latest_checkpoint(manager.root).step == 4
    assert written == [manager.root / "step_00000004.partial"] and manager.pending is None
    ckpt = manager.root / "step_00000004"
    assert torch.equal(torch.load(ckpt / "model_states.pt", weights_only=True)["w"], torch.arange(1000.0))
    state = json.loads((ckpt / STATE_FILE).read_text())
    assert state["consumed"] == 32 and state["step"] == 4
    for name, sha in state["sha256"].items():  # hashed as written, by the writer thread
        assert file_sha256(ckpt / name) == sha, name
    assert manager.finish() is None  # nothing pending


def _join_writer_threads() -> None:
    for thread in threading.enumerate():
        if thread.name.startswith("checkpoint-writer"):
            thread.join(10)
            assert not thread.is_alive()


def _kept_ptrs(manager: CheckpointManager) -> set[int]:
    return {s.data_ptr() for kept in manager.host_memory._free.values() for s in kept}


def test_background_saves_reuse_the_host_memory_of_the_one_before(tmp_path, plain_writer):
    manager, writer = _manager(tmp_path), _HeldWriter()
    writer.go.set()
    engine = _Engine(writer)
    manager.save(engine, 2, {}, "run: {}\n", background=True)
    manager.finish()
    kept = _kept_ptrs(manager)
    assert manager.host_memory.kept_bytes() == 4000  # the 1000 float32 of w, kept once written
    engine.w.add_(1.0)
    manager.save(engine, 4, {}, "run: {}\n", background=True)
    assert not _kept_ptrs(manager)  # taken by step 4's copy ...
    manager.finish()
    assert _kept_ptrs(manager) == kept  # ... the same memory, back once step 4 is written
    saved = torch.load(manager.root / "step_00000004" / "model_states.pt", weights_only=True)["w"]
    assert torch.equal(saved, torch.arange(1000.0) + 1.0)


def test_an_abandoned_saves_copy_is_never_handed_out_again(tmp_path, plain_writer):
    manager, held = _manager(tmp_path), _HeldWriter()
    manager.save(_Engine(held), 2, {}, "run: {}\n", background=True)
    manager.abandon()  # its write still holds the copy (held before it begins)
    writer = _HeldWriter()
    writer.go.set()
    manager.save(_Engine(writer), 4, {}, "run: {}\n", background=True)
    manager.finish()
    assert manager.host_memory.kept_bytes() == 4000  # step 4's copy only, not the abandoned one too
    held.go.set()


def test_a_save_that_fails_on_a_lost_rank_abandons_its_background_writes(tmp_path, plain_writer):
    class LostPeer:  # DeepSpeed's save: this rank's files handed to the writer, then a collective fails
        def __init__(self, writer):
            self.checkpoint_engine = writer

        def save_checkpoint(self, root, tag, client_state, save_latest):
            (Path(root) / tag).mkdir(parents=True, exist_ok=True)
            self.checkpoint_engine.save({"w": torch.ones(1000)}, str(Path(root) / tag / "model_states.pt"))
            raise torch.distributed.DistNetworkError("Connection closed by peer [10.0.0.2]:4242")

    manager, held = _manager(tmp_path), _HeldWriter()
    with pytest.raises(torch.distributed.DistNetworkError):  # as it was: the trainer's roll call follows
        manager.save(LostPeer(held), 2, {}, "run: {}\n", background=True)
    held.go.set()  # the write begins after the save failed: abandoned, its first bytes raise
    _join_writer_threads()
    partial = manager.root / "step_00000002.partial" / "model_states.pt"
    assert not partial.exists() or partial.stat().st_size < 4000
    assert manager.pending is None and manager.host_memory.kept_bytes() == 0


def test_a_new_save_first_completes_the_pending_one(tmp_path, plain_writer):
    manager, writer = _manager(tmp_path), _HeldWriter()
    writer.go.set()
    manager.save(_Engine(writer), 2, {}, "run: {}\n", background=True)
    ref = manager.save(_Engine(writer), 4, {}, "run: {}\n")
    assert ref.step == 4 and [r.step for r in complete_checkpoints(manager.root)] == [2, 4]


def test_a_failed_background_write_is_a_checkpoint_error_and_the_last_checkpoint_stays_latest(
    tmp_path, plain_writer
):
    manager = _manager(tmp_path)
    ok = _HeldWriter()
    ok.go.set()
    manager.save(_Engine(ok), 2, {}, "run: {}\n")
    failing = _HeldWriter(fail=RuntimeError("[enforce fail at inline_container.cc:595] . unexpected pos"))
    failing.go.set()
    manager.save(_Engine(failing), 4, {}, "run: {}\n", background=True)
    with pytest.raises(
        CheckpointWriteError, match=r"step_00000004 \(rank 0: .*unexpected pos\).*step_00000002 is still"
    ):
        manager.finish()
    assert latest_checkpoint(manager.root).step == 2


# --- the trainer: when a background save completes ----------------------------------------------


class _SlowWrites:
    """CheckpointManager's interface; a background save's files take `busy_steps` steps to write."""

    root = Path("unused")

    def __init__(self, busy_steps: int):
        self.busy_steps, self.pending, self.trainer = busy_steps, None, None
        self.saves: list[tuple[int, bool]] = []  # (step, background)
        self.completed: list[tuple[int, int]] = []  # (checkpoint's step, steps done when it completed)
        self.abandoned: list[int] = []

    def save(self, engine, step, state, config_yaml, write_extras=None, on_written=None, *, background=False):
        assert self.pending is None, "a new save while one is pending"
        self.saves.append((step, background))
        self.pending = SimpleNamespace(step=step, until=step + self.busy_steps)
        if not background:
            self.finish()

    def writing(self) -> bool:
        return self.pending is not None and self.trainer.step < self.pending.until

    def finish(self):
        if self.pending is not None:
            self.completed.append((self.pending.step, self.trainer.step))
            self.pending = None

    def abandon(self):
        if self.pending is not None:
            self.abandoned.append(self.pending.step)
            self.pending = None


def _async_trainer(busy_steps: int, callbacks=(), **kw):
    from tests.unit.stand_in_trainer import stand_in_trainer

    checkpoints = _SlowWrites(busy_steps)
    trainer = stand_in_trainer(list(callbacks), save_async=True, checkpoints=checkpoints, **kw)
    checkpoints.trainer = trainer
    return trainer, checkpoints


def test_the_trainer_completes_a_background_save_at_the_first_step_after_its_writes_and_waits_at_the_end():
    trainer, ckpts = _async_trainer(busy_steps=1, max_steps=7, save_every=3)
    assert trainer.fit() == 0
    # step 3's save: still writing when step 4 began, done when step 5 began; step 6's still
    # writing at the end: completed there, then the end save of step 7 written in the foreground
    assert ckpts.saves == [(3, True), (6, True), (7, False)]
    assert ckpts.completed == [(3, 4), (6, 7), (7, 7)]
    assert trainer.last_saved_step == 7


def test_a_background_save_completes_only_when_no_rank_is_still_writing(monkeypatch):
    import ds_train.train.trainer as trainer_module

    trainer, ckpts = _async_trainer(busy_steps=1, max_steps=7, save_every=3)

    def with_a_slower_peer(flags):  # the step's all-reduce, with a rank whose writes take 3 steps
        if flags.numel() == 4 and ckpts.pending is not None and trainer.step < ckpts.pending.step + 3:
            flags[3] += 1.0
        return flags

    monkeypatch.setattr(trainer_module, "all_reduce_sum", with_a_slower_peer)
    assert trainer.fit() == 0
    # this rank's files of step 3 were written by step 4, the peer's only by step 6: completing
    # at step 4 would gather from a rank still writing (on real ranks, a hang)
    assert ckpts.completed == [(3, 6), (6, 7), (7, 7)]


@pytest.mark.parametrize(
    "stop_at, saves, completed",
    [
        (4, [(3, True), (4, False)], [(3, 4), (4, 4)]),
        (3, [(3, True)], [(3, 3)]),  # the signal came in the saved step: completing it is enough
    ],
)
def test_a_stop_signal_completes_the_background_save_before_the_requeue_save(stop_at, saves, completed):
    from ds_train.train.callbacks.base import Callback
    from ds_train.train.trainer import PREEMPTED_EXIT_CODE

    class Stop(Callback):
        def on_step_end(self, trainer):
            if trainer.step == stop_at:
                trainer.request_stop("SIGUSR1")

    trainer, ckpts = _async_trainer(busy_steps=5, callbacks=[Stop()], max_steps=9, save_every=3)
    assert trainer.fit() == PREEMPTED_EXIT_CODE
    assert ckpts.saves == saves and ckpts.completed == completed
    assert trainer.last_saved_step == stop_at


def test_a_nonfinite_stop_completes_the_pending_background_save_first():
    from ds_train.train.nonfinite import NonFiniteLossError

    def batches():  # stand-in batches that say where their samples come from, as the loader's do
        from tests.unit.stand_in_trainer import stand_in_batches

        for b in stand_in_batches():
            yield {**b, "source": torch.tensor([0]), "shard": torch.tensor([2]), "row": torch.tensor([7])}

    trainer, ckpts = _async_trainer(busy_steps=5, batches=batches(), max_steps=9, save_every=3)

    class NanInStep5:
        def loss_sum(self, engine, batch):
            return torch.tensor(float("nan") if trainer.step + 1 == 5 else 2.0)

    trainer.objective = NanInStep5()
    with pytest.raises(NonFiniteLossError, match="non-finite loss in step 5"):
        trainer.fit()
    # found at the start of step 6, still writing step 3's files: completed (waiting) before the stop
    assert ckpts.saves == [(3, True)] and ckpts.completed == [(3, 5)]


def test_a_run_that_fails_abandons_its_pending_background_save_instead_of_waiting_for_it():
    from ds_train.train.callbacks.base import Callback

    class FailInStep5(Callback):
        def on_step_start(self, trainer):
            if trainer.step + 1 == 5:
                raise RuntimeError("a callback failed")

    trainer, ckpts = _async_trainer(busy_steps=5, callbacks=[FailInStep5()], max_steps=9, save_every=3)
    with pytest.raises(RuntimeError, match="a callback failed"):
        trainer.fit()
    assert ckpts.saves == [(3, True)] and ckpts.completed == [] and ckpts.abandoned == [3]


def test_an_abandoned_background_save_stops_writing_and_is_never_latest(tmp_path, plain_writer):
    manager, writer = _manager(tmp_path), _HeldWriter()
    manager.save(_Engine(writer), 4, {}, "run: {}\n", background=True)
    manager.abandon()
    writer.go.set()  # the write begins after it was abandoned: its first bytes raise
    _join_writer_threads()
    assert manager.pending is None and latest_checkpoint(manager.root) is None
    partial = manager.root / "step_00000004.partial" / "model_states.pt"
    assert not partial.exists() or partial.stat().st_size < 4000  # 1000 float32 were not written
    manager.abandon()  # nothing pending: nothing to do


def test_a_stopped_write_ends_within_one_piece_not_one_whole_storage(monkeypatch):
    import ds_train.checksum as checksum

    monkeypatch.setattr(checksum, "STOP_CHECK_BYTES", 16)
    stop, out = threading.Event(), io.BytesIO()

    class StopAfterFirstPiece(io.BytesIO):  # the run fails while the first piece is written
        def write(self, data):
            stop.set()
            return out.write(data)

    sink = checksum.HashingWriter(StopAfterFirstPiece(), stop=stop)
    with pytest.raises(OSError, match="abandoned"):
        sink.write(bytes(100))  # one storage, written whole by torch.save
    assert len(out.getvalue()) == 16


def test_the_rng_state_saved_is_the_saved_steps_not_the_completions(tmp_path, plain_writer):
    manager, writer = _manager(tmp_path), _HeldWriter()
    at_save = torch.get_rng_state()
    manager.save(_Engine(writer), 4, {}, "run: {}\n", background=True)
    torch.rand(8)  # training goes on, drawing random numbers
    writer.go.set()
    manager.finish()
    saved = torch.load(manager.root / "step_00000004" / "rng" / "rank_00000.pt", weights_only=True)
    assert torch.equal(saved["torch"], at_save) and not torch.equal(saved["torch"], torch.get_rng_state())


def test_a_host_copy_that_fails_is_reported_when_the_save_completes(tmp_path, plain_writer, monkeypatch):
    import ds_train.checkpoint.deepspeed_io as deepspeed_io

    def out_of_memory(state, memory=None):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 17 GB")

    monkeypatch.setattr(deepspeed_io, "host_snapshot", out_of_memory)
    manager, writer = _manager(tmp_path), _HeldWriter()
    writer.go.set()
    # DeepSpeed's save returns on this rank as on the others (no rank leaves its barrier alone) ...
    assert manager.save(_Engine(writer), 4, {}, "run: {}\n", background=True) is None
    # ... and every rank learns of the failure when the save completes
    with pytest.raises(CheckpointWriteError, match=r"step_00000004 \(rank 0: .*can't allocate memory"):
        manager.finish()
    assert latest_checkpoint(manager.root) is None


def test_a_full_disk_is_named_and_the_failed_saves_files_are_removed(tmp_path, monkeypatch):
    """torch's zip writer reports ENOSPC as its own state ('unexpected pos 3574592 vs 3574544'),
    which was all a full disk said at the first save; and the failed save's `.partial` files stayed,
    holding the space a re-run needs (cloud-user audit)."""
    import shutil as shutil_module
    from collections import namedtuple

    from ds_train.checkpoint import manager as manager_module
    from ds_train.checkpoint.manager import CheckpointWriteError

    manager = _manager(tmp_path)
    manager.root.mkdir(parents=True)
    torch_error = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 3584 vs 3476")
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil_module, "disk_usage", lambda p: usage(3 << 20, 3 << 20, 0))
    said = manager_module._describe(torch_error, manager.root)
    assert (
        said.startswith("No space left on device: 0 bytes free on the file system of")
        and "unexpected pos" in said
    )
    monkeypatch.setattr(shutil_module, "disk_usage", lambda p: usage(1 << 40, 0, 1 << 40))
    assert manager_module._describe(torch_error, manager.root).startswith(
        "[enforce fail"
    )  # room: not the disk
    partial = manager.root / "step_00000002.partial"
    (partial / "rng").mkdir(parents=True)
    with pytest.raises(CheckpointWriteError, match="could not write checkpoint step_00000002"):
        manager._agree("step_00000002", ["No space left on device"])
    assert not partial.exists()
