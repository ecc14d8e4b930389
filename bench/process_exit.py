"""How the per-rank benchmark scripts end.

A 2-rank gloo job on CPU sometimes aborts at interpreter exit with "terminate called without an
active exception" (a C++ thread of the communication stack still joinable while static objects
are destroyed), after the script has printed its result. The figures are already out, but
torchrun reports the job failed and the benchmark loses the run. ds-train itself meets the peers
at a barrier before tearing the process group down (distributed/engine.py, `shutdown`); a
benchmark script only has to leave without running those destructors at all.
"""

from __future__ import annotations

import os
import sys

import torch.distributed as dist


def leave(code: int = 0) -> None:
    """Meet the other ranks, flush, and exit without interpreter teardown."""
    if dist.is_initialized():
        dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
