"""How the per-rank benchmark scripts end, as ds-train does: meet the other ranks and tear the
group down (`shutdown`), then leave without interpreter teardown (ds_train/distributed/
process_exit.py says why: a 2-rank gloo job can abort at exit after printing its figures, and
torchrun would report the run failed)."""

from __future__ import annotations

from ds_train.distributed.engine import shutdown
from ds_train.distributed.process_exit import exit_process


def leave(code: int = 0) -> None:
    shutdown(wait_for_peers=True)
    exit_process(code)
