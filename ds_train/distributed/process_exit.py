"""How a ds-train process ends once its work is done.

A rank that has finished everything (checkpoint written, peers met at a barrier, process group
destroyed) can still die at interpreter exit with "terminate called without an active exception"
(SIGABRT, exit 134): some C++ thread of the communication stack (gloo's, DeepSpeed's CPU comm
op's) is still joinable when the interpreter tears down and static destructors run. It failed 3
of 6 fresh-clone CI runs on 2026-12-05, in a plain DeepSpeed script as well as in ds-train. The
exit status is what Slurm requeues on and what a launcher reports, so a finished run must not turn
into a crash at its last instruction: once the work is done we do the Python half of an
interpreter exit ourselves (join threads, run `atexit` callbacks so trackers and loggers flush,
flush the streams) and leave with `os._exit`, which skips the C++ half. Processes that never
imported torch (usage errors, commands that need no torch) exit the ordinary way.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import sys
import threading
from typing import NoReturn


def exit_process(code: int) -> NoReturn:
    """End this process with `code`, without C++ teardown once torch (which always loads
    torch.distributed) is in the process; otherwise the ordinary way."""
    if "torch.distributed" not in sys.modules:
        sys.exit(code)
    # What Py_FinalizeEx does before the destructors, in its order. threading._shutdown runs the
    # threading-atexit hooks (concurrent.futures wakes its idle workers there: joining them without
    # it would wait for ever) and joins the non-daemon threads; then the atexit callbacks (wandb's
    # finish, multiprocessing's reaping of DataLoader workers, logging's flush). Both are
    # CPython's own hooks for those steps.
    threading._shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # closed, or a broken pipe: nothing to reach
            stream.flush()
    with contextlib.suppress(OSError, AttributeError):  # C stdio buffers (native libraries' printf)
        ctypes.CDLL(None).fflush(None)
    os._exit(code)
