"""Which rank is slow: each rank times its own forwards; every log step gathers one number per rank.

In synchronous data parallelism every rank waits for the slowest at each gradient reduction, so
one slow rank (a throttled or failing GPU, a node shared with another job, a host too slow to
launch kernels) slows the whole job, and metrics.jsonl's step time shows that the job is slow,
not where. MegaScale and the Llama 3 report name stragglers among the main thieves of large-job
time; Megatron-LM has a straggler detector for it.

Why the forward: under ZeRO 0-2 the forward runs no collective, so its duration is the rank's own.
Backward and the optimizer step hold the gradient reduction and the parameter all-gather, where
the fast ranks wait for the slow one and every rank looks equally slow. Under ZeRO-3 the forward
gathers parameters from all ranks too, so there a straggler shows only as much as its compute
between two gathers outlasts the prefetch (docs/performance.md "Stragglers").

On a GPU the forwards are timed with CUDA events (no host sync in the step: they are read at the
log step, after the log's own all-reduce has waited for the device); on the CPU, where operators
run synchronously, with the host clock.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ds_train.distributed.engine import all_gather_floats, all_gather_object

log = logging.getLogger(__name__)


class ForwardClock:
    """Sums this rank's forward time between two `take()`s; `with clock:` around each forward."""

    def __init__(self, device: torch.device):
        self._cuda = device.type == "cuda"
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._seconds = 0.0
        self._t0 = 0.0

    def __enter__(self) -> ForwardClock:
        if self._cuda:
            start = torch.cuda.Event(enable_timing=True)
            start.record()
            self._events.append((start, torch.cuda.Event(enable_timing=True)))
        else:
            self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self._cuda:
            self._events[-1][1].record()
        else:
            self._seconds += time.perf_counter() - self._t0

    def take(self) -> float:
        """Seconds of forward since the last take (waits for the last recorded forward's end)."""
        if self._events:
            self._events[-1][1].synchronize()
            self._seconds += sum(start.elapsed_time(end) for start, end in self._events) / 1000
            self._events.clear()
        seconds, self._seconds = self._seconds, 0.0
        return seconds


@dataclass(frozen=True)
class RankSkew:
    """One log interval's forward time per step: the slowest rank's against the median of the
    others' (with the slowest in it, 2 ranks could never differ by more than 2x: the median of two
    is their mean)."""

    slowest_rank: int
    slowest_s: float
    others_s: float

    @property
    def ratio(self) -> float:
        return self.slowest_s / self.others_s if self.others_s > 0 else 1.0


def rank_skew(forward_s: Sequence[float]) -> RankSkew:
    """Needs at least two ranks."""
    slowest = max(range(len(forward_s)), key=lambda r: forward_s[r])
    others = [s for r, s in enumerate(forward_s) if r != slowest]
    return RankSkew(slowest, forward_s[slowest], statistics.median(others))


class StragglerWatch:
    """Gathers each rank's forward time at a log step (a collective: every rank calls `interval`),
    returns the metrics.jsonl fields, and has rank 0 warn when a rank's forwards take
    `warn_ratio` × the other ranks' median or more (once when a rank starts straggling, once when it stops)."""

    def __init__(self, device: torch.device, rank: int, world_size: int, warn_ratio: float):
        self.clock = ForwardClock(device)
        self.device, self.rank, self.world_size, self.warn_ratio = device, rank, world_size, warn_ratio
        self._hosts: list[str] | None = None
        self._flagged: int | None = None  # the rank last warned about, while it stays over the ratio

    def host(self, rank: int) -> str:
        if self._hosts is None:  # gathered at the first log step, by every rank alike
            import socket

            self._hosts = all_gather_object(socket.gethostname())
        return self._hosts[rank]

    def interval(self, steps: int, first_step: int, last_step: int) -> dict:
        """This interval's fields; {} on one rank (nothing to compare)."""
        seconds = self.clock.take()
        if self.world_size < 2:
            return {}
        skew = rank_skew([s / steps for s in all_gather_floats(seconds, self.device)])
        host = self.host(skew.slowest_rank)
        if self.rank == 0:
            self._warn(skew, host, first_step, last_step)
        return {
            "forward_s": skew.others_s,  # a typical rank's (the median of all but the slowest)
            "slowest_rank": skew.slowest_rank,
            "slowest_rank_host": host,
            "slowest_forward_s": skew.slowest_s,
            "slowest_forward_ratio": skew.ratio,
        }

    def _warn(self, skew: RankSkew, host: str, first_step: int, last_step: int) -> None:
        straggling = bool(self.warn_ratio) and skew.ratio >= self.warn_ratio
        if straggling and skew.slowest_rank != self._flagged:
            log.warning(
                "rank %d on %s is a straggler: its forwards took %.2fx the other ranks' median in steps %d-%d "
                "(%.1f vs %.1f ms per step); every rank waits for it at each gradient reduction "
                "(a throttled or failing GPU, another job on the node? docs/performance.md 'Stragglers')",
                skew.slowest_rank,
                host,
                skew.ratio,
                first_step,
                last_step,
                1e3 * skew.slowest_s,
                1e3 * skew.others_s,
            )
            self._flagged = skew.slowest_rank
        elif not straggling and self._flagged is not None:
            log.info(
                "rank %d keeps pace again in steps %d-%d (%.2fx)",
                self._flagged,
                first_step,
                last_step,
                skew.ratio,
            )
            self._flagged = None
