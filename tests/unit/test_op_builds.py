"""Loading DeepSpeed's compiled ops without hanging on a killed build's lock (ds_train/distributed/op_builds.py).

The fake `load` below behaves as torch's cpp_extension.load does with its FileBaton: it takes the
build directory's `lock` with O_EXCL, builds, and removes it; with the lock present it would wait
for ever, so here it fails instead. The real op, built and killed for real, is in
tests/distributed/test_op_build_lock.py."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from ds_train.distributed.op_builds import FLOCK_FILE, OWNER_FILE, comm_ops, guarded_load, ops_for

REPO = Path(__file__).resolve().parents[2]


def torch_style_load(directory: Path, seconds: float = 0.0):
    """A load that, like torch's, must find no lock: it takes one, 'builds', releases it."""

    def load():
        fd = os.open(directory / "lock", os.O_CREAT | os.O_EXCL)  # FileExistsError: it would hang
        time.sleep(seconds)
        os.close(fd)
        os.remove(directory / "lock")
        return "module"

    return load


def _child(directory: Path, body: str) -> subprocess.Popen:
    """A separate process running guarded_load on `directory` with `body` as its load."""
    code = "\n".join(
        [
            "import os, sys, time",
            "from pathlib import Path",
            "from ds_train.distributed.op_builds import guarded_load",
            f"d = Path({str(directory)!r})",
            "def load():",
            textwrap.indent(textwrap.dedent(body).strip(), "    "),
            "guarded_load('fake_op', load, directory=d)",
        ]
    )
    return subprocess.Popen([sys.executable, "-c", code], cwd=REPO)


def _within(seconds: float, fn):
    """fn() in a thread, failing after `seconds` instead of hanging as a wrongly kept lock would."""
    result = []
    thread = threading.Thread(target=lambda: result.append(fn()), daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still waiting after {seconds} s"
    return result[0]


def _wait_for(path: Path, timeout: float = 30.0) -> None:
    t0 = time.monotonic()
    while not path.exists():
        assert time.monotonic() - t0 < timeout, f"{path} never appeared"
        time.sleep(0.05)


def _ds_config(tmp_path: Path, **zero) -> dict:
    from ds_train.config.loader import load_config
    from ds_train.distributed.deepspeed_config import build_deepspeed_config

    (tmp_path / "nvme").mkdir(exist_ok=True)
    train = {"max_steps": 1, "global_batch_size": 8, "micro_batch_size": 4, "precision": "fp32"}
    cfg = load_config(None, base={"run": {"output_dir": str(tmp_path)}, "train": train, "zero": zero})
    return build_deepspeed_config(cfg, 2)


def test_ops_follow_the_deepspeed_config_ds_train_builds(tmp_path):
    nvme = str(tmp_path / "nvme")
    assert ops_for(_ds_config(tmp_path, stage=3)) == []  # torch's AdamW: nothing compiled
    assert ops_for(_ds_config(tmp_path, preset="stage2-offload-optimizer")) == ["CPUAdamBuilder"]
    assert ops_for(_ds_config(tmp_path, preset="stage3-offload-all")) == ["CPUAdamBuilder"]
    assert ops_for(_ds_config(tmp_path, preset="stage3-nvme", nvme_path=nvme)) == [
        "CPUAdamBuilder",
        "AsyncIOBuilder",
    ]
    params_only = _ds_config(tmp_path, stage=3, offload_param="nvme", nvme_path=nvme)
    assert ops_for(params_only) == ["AsyncIOBuilder"]  # parameters swap; the optimizer stays on device
    # overrides that change DeepSpeed's optimizer change the op it compiles
    lion = {"optimizer": {"type": "Lion"}, "zero_optimization": {"offload_optimizer": {"device": "cpu"}}}
    assert ops_for(lion) == ["CPULionBuilder"]
    assert ops_for({"optimizer": {"type": "AdamW", "params": {}}}) == ["FusedAdamBuilder"]
    # and, before any config, DeepSpeed's shared-memory collectives on its CPU accelerator
    assert comm_ops("cpu") == ["ShareMemCommBuilder"] and comm_ops("cuda") == []


def test_deepspeed_reuses_the_op_ds_train_loaded(tmp_path, monkeypatch):
    """What the guard relies on: DeepSpeed's own `CPUAdamBuilder().load()` (as DeepSpeedCPUAdam
    calls it) returns the module load_ops loaded, without a second cpp_extension.load. torch's
    compile is replaced by a stand-in; DeepSpeed's builder and cache are real."""
    import torch.utils.cpp_extension
    from deepspeed.ops.op_builder import CPUAdamBuilder
    from deepspeed.ops.op_builder.builder import OpBuilder

    from ds_train.distributed.op_builds import load_ops

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(OpBuilder, "_loaded_ops", {})
    calls = []
    module = object()

    def compile_stand_in(name, **kwargs):
        calls.append(name)
        return module

    monkeypatch.setattr(torch.utils.cpp_extension, "load", compile_stand_in)
    load_ops(["CPUAdamBuilder"])
    load_ops(["CPUAdamBuilder"])  # already loaded: not again
    assert CPUAdamBuilder().load() is module
    assert calls == ["cpu_adam"]
    assert (tmp_path / "cpu_adam" / FLOCK_FILE).exists()  # loaded through the guard


def test_the_lock_of_a_builder_killed_mid_build_is_removed_at_once(tmp_path, caplog):
    builder = _child(tmp_path, "os.open(d / 'lock', os.O_CREAT | os.O_EXCL); time.sleep(600)")
    _wait_for(tmp_path / "lock")
    builder.send_signal(signal.SIGKILL)  # as Slurm or the OOM killer would: no finally runs
    builder.wait()
    assert (tmp_path / "lock").exists() and (tmp_path / OWNER_FILE).exists()  # what torch would wait on

    with caplog.at_level(logging.WARNING, logger="ds_train.distributed.op_builds"):
        # an hour's quiet would be needed by the directory rule: the dead owner is recognised instead
        load = torch_style_load(tmp_path)
        assert (
            _within(5, lambda: guarded_load("fake_op", load, stale_after_s=3600, directory=tmp_path))
            == "module"
        )
    assert f"process {builder.pid} is gone" in caplog.text and str(tmp_path / "lock") in caplog.text
    assert not (tmp_path / "lock").exists() and not (tmp_path / OWNER_FILE).exists()


def test_a_lock_nothing_changes_under_while_watched_is_removed(tmp_path, caplog):
    """Left by a process outside ds_train (no owner file), or one on another host: removed after
    `stale_after_s` of watching the build directory not change (not by comparing file times with
    this host's clock)."""
    (tmp_path / "lock").touch()
    (tmp_path / "cpu_adam.o").touch()
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="ds_train.distributed.op_builds"):
        _within(
            20,
            lambda: guarded_load("fake_op", torch_style_load(tmp_path), stale_after_s=2, directory=tmp_path),
        )
    assert time.monotonic() - t0 >= 2
    assert "changed in 2 s of watching" in caplog.text


def test_a_build_that_outlives_its_ds_train_process_is_waited_for(tmp_path, caplog):
    """A rank OOM-killed mid-build: its ninja and compilers go on in the build directory. Its lock
    is removed only once no process on this host works there."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / OWNER_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid}))
    (tmp_path / "lock").touch()
    ninja = subprocess.Popen(["sleep", "2"], cwd=tmp_path)  # the orphaned build, working there
    with caplog.at_level(logging.WARNING, logger="ds_train.distributed.op_builds"):
        _within(
            20,
            lambda: guarded_load(
                "fake_op", torch_style_load(tmp_path), stale_after_s=3600, directory=tmp_path
            ),
        )
        ended = ninja.poll()
    assert ended is not None, "the lock was removed while the build still ran"
    assert f"process {dead.pid} is gone" in caplog.text and "waiting on" in caplog.text


def test_a_live_build_is_waited_for_and_its_lock_left_alone(tmp_path, caplog):
    """A build outside ds_train that keeps writing object files: never taken for a dead one."""
    (tmp_path / "lock").touch()
    finished = threading.Event()

    def other_builder():  # writes an object file every 0.2 s for 4 s, then releases its lock
        for i in range(20):
            (tmp_path / f"part{i}.o").touch()
            time.sleep(0.2)
        os.remove(tmp_path / "lock")  # FileNotFoundError if ds_train had removed it
        finished.set()

    thread = threading.Thread(target=other_builder)
    thread.start()
    with caplog.at_level(logging.WARNING, logger="ds_train.distributed.op_builds"):
        guarded_load("fake_op", torch_style_load(tmp_path), stale_after_s=3.0, directory=tmp_path)
    thread.join()
    assert finished.is_set()
    assert "waiting on" in caplog.text and f"removed {tmp_path / 'lock'}" not in caplog.text


def test_a_live_ds_train_owner_on_this_host_is_not_taken_for_dead(tmp_path, caplog):
    (tmp_path / "lock").touch()
    (tmp_path / OWNER_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
    released = threading.Event()

    def owner_finishes():
        os.remove(tmp_path / "lock")  # FileNotFoundError if ds_train had removed it
        released.set()

    timer = threading.Timer(1.0, owner_finishes)
    timer.start()
    with caplog.at_level(logging.WARNING, logger="ds_train.distributed.op_builds"):
        guarded_load("fake_op", torch_style_load(tmp_path), stale_after_s=3600, directory=tmp_path)
    timer.join()
    assert released.is_set() and f"removed {tmp_path / 'lock'}" not in caplog.text


def test_processes_loading_one_op_take_turns(tmp_path):
    """Two processes (two ranks, or two jobs on one host): one loads while the other waits on the
    flock, so the owner file names the one builder (the loads here take no torch lock: only the
    flock keeps them apart)."""
    log = tmp_path / "log"
    body = """
        with open(d / 'log', 'a') as f: f.write(f'start {time.time()}\\n')
        time.sleep(1.0)
        with open(d / 'log', 'a') as f: f.write(f'end {time.time()}\\n')
    """
    children = [_child(tmp_path, body) for _ in range(2)]
    assert [c.wait(timeout=60) for c in children] == [0, 0]  # a second O_EXCL would have failed
    events = [line.split() for line in log.read_text().splitlines()]
    assert [e[0] for e in events] == ["start", "end", "start", "end"]
    assert float(events[2][1]) >= float(events[1][1])


def test_a_built_op_is_loaded_without_taking_turns(tmp_path):
    """Ranks loading an op that is already built (every start after the first) do not queue on the
    flock; an op not yet built does."""
    import fcntl

    (tmp_path / "fake_op.so").touch()
    with open(tmp_path / FLOCK_FILE, "a") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)  # another loader holds the flock
        assert _within(5, lambda: guarded_load("fake_op", lambda: "module", directory=tmp_path)) == "module"
        (tmp_path / "fake_op.so").unlink()
        with pytest.raises(AssertionError, match="still waiting"):
            _within(1.5, lambda: guarded_load("fake_op", lambda: "module", directory=tmp_path))


def test_a_cache_the_guard_cannot_write_falls_back_to_deepspeeds_own_load(tmp_path, caplog):
    not_a_directory = tmp_path / "cpu_adam"
    not_a_directory.write_text("")  # as a read-only cache would, the guard's files cannot be made
    with caplog.at_level(logging.WARNING, logger="ds_train.distributed.op_builds"):
        assert guarded_load("fake_op", lambda: "module", directory=not_a_directory) == "module"
    assert "without ds_train's guard" in caplog.text


def test_a_failed_build_leaves_no_owner_and_the_next_load_goes_ahead(tmp_path):
    def broken():
        raise RuntimeError("compiler error")

    with pytest.raises(RuntimeError, match="compiler error"):
        guarded_load("fake_op", broken, directory=tmp_path)
    assert not (tmp_path / OWNER_FILE).exists()
    assert guarded_load("fake_op", torch_style_load(tmp_path), directory=tmp_path) == "module"
