"""The console entry's exit: the status survives, Python's exit work still happens, and, once
torch.distributed is loaded, interpreter teardown (where the C++ abort lives) does not."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.helpers import REPO, clean_env

# A child that runs `console_main` with a stand-in command. It leaves one file per piece of exit
# work: a non-daemon thread finishing late, an atexit callback, a logging handler's buffer, and an
# object whose __del__ only runs when the interpreter tears __main__ down.
CHILD = textwrap.dedent(
    """
    import atexit, concurrent.futures, logging, sys, threading, time
    from pathlib import Path

    out = Path(sys.argv[1])
    if sys.argv[2] == "distributed":
        import torch.distributed  # noqa: F401

    class Teardown:
        def __del__(self):
            (out / "teardown").write_text("ran")

    keep = Teardown()

    def late_thread():
        time.sleep(0.3)
        (out / "thread").write_text("joined")

    def command():
        threading.Thread(target=late_thread).start()
        # an idle pool left open (torch inductor keeps one): its workers are non-daemon threads
        # that only wake in threading's own exit hooks
        pool = concurrent.futures.ThreadPoolExecutor(2)
        pool.submit(time.sleep, 0.01).result()
        globals()["pool"] = pool
        atexit.register(lambda: (out / "atexit").write_text("ran"))
        handler = logging.handlers.MemoryHandler(100, target=logging.FileHandler(out / "log"))
        logging.getLogger("probe").addHandler(handler)
        logging.getLogger("probe").warning("logged")
        print("printed, not flushed")
        if sys.argv[3] == "raise":
            raise RuntimeError("unexpected")
        if sys.argv[3] == "exit-message":
            sys.exit("a library gave up")
        if sys.argv[3] == "interrupt":
            raise KeyboardInterrupt
        return int(sys.argv[3])

    import logging.handlers
    import ds_train.cli as cli

    cli.main = command
    cli.console_main()
    """
)


def _run(tmp_path: Path, mode: str, result: str) -> tuple[subprocess.CompletedProcess, dict[str, bool]]:
    env = clean_env()
    env.pop("PYTHONUNBUFFERED")  # stdout to a pipe is block-buffered, as under a launcher
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path), mode, result],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    made = {name: (tmp_path / name).exists() for name in ("thread", "atexit", "log", "teardown")}
    return proc, made


def test_distributed_process_keeps_its_status_and_exit_work_but_skips_teardown(tmp_path):
    proc, made = _run(tmp_path, "distributed", "75")
    assert proc.returncode == 75, proc.stderr
    assert "printed, not flushed" in proc.stdout
    assert made == {"thread": True, "atexit": True, "log": True, "teardown": False}
    assert "logged" in (tmp_path / "log").read_text()


def test_unexpected_error_prints_its_traceback_and_exits_1(tmp_path):
    proc, made = _run(tmp_path, "distributed", "raise")
    assert proc.returncode == 1
    assert "RuntimeError: unexpected" in proc.stderr and "Traceback" in proc.stderr
    assert made["atexit"] and not made["teardown"]


@pytest.mark.parametrize(
    ("how", "status", "said"), [("exit-message", 1, "a library gave up"), ("interrupt", 130, "")]
)
def test_sys_exit_and_ctrl_c_keep_the_interpreters_statuses(tmp_path, how, status, said):
    proc, made = _run(tmp_path, "distributed", how)
    assert proc.returncode == status
    assert said in proc.stderr and "Traceback" not in proc.stderr
    assert made["atexit"] and not made["teardown"]


def test_process_without_torch_distributed_exits_the_ordinary_way(tmp_path):
    proc, made = _run(tmp_path, "plain", "3")
    assert proc.returncode == 3, proc.stderr
    assert "printed, not flushed" in proc.stdout
    # the probe itself works: an ordinary exit does tear __main__ down
    assert made == {"thread": True, "atexit": True, "log": True, "teardown": True}
