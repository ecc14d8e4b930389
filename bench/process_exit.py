"""How the per-rank benchmark scripts end: meet the other ranks, then ds-train's exit without
interpreter teardown (ds_train/distributed/process_exit.py says why: a 2-rank gloo job can abort at
exit after printing its figures, and torchrun would report the run failed)."""

from __future__ import annotations

import torch.distributed as dist

from ds_train.distributed.process_exit import exit_process


def leave(code: int = 0) -> None:
    if dist.is_initialized():
        dist.barrier()
    exit_process(code)
