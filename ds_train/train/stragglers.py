"""Which rank is slow: each rank times its own forwards; every log step gathers them from all ranks.

In synchronous data parallelism every rank waits for the slowest at each gradient reduction, so
one slow rank (a throttled or failing GPU, a node shared with another job, a host too slow to
launch kernels) slows the whole job, and metrics.jsonl's step time shows that the job is slow,
not where. MegaScale and the Llama 3 report name stragglers among the main thieves of large-job
time; Megatron-LM has a straggler detector for it.

Why the forward: under ZeRO 0-2 the forward runs no collective, so its duration is the rank's own.
Backward and the optimizer step hold the gradient reduction and the parameter all-gather, where
the fast ranks wait for the slow one and every rank looks equally slow. Under ZeRO-3 the forward
gathers each layer's parameters from all ranks as it goes, so the whole forward is coupled too
(measured: a rank made 2x slower read 1.01x); there the clock sums the forwards of the model's
linear layers instead, timed from hooks that run after DeepSpeed's parameter-fetch hook and
after its release hook: the matrix products without the waits between them.

On a GPU the forwards are timed with CUDA events (the clock adds no host sync: they are read at
the log step, after the log's own all-reduce has waited for the device); on the CPU, where
operators run synchronously, with the host clock. Timed by layer, the forwards that activation
checkpointing recomputes in backward count too, alike on every rank.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ds_train.distributed.engine import all_gather_floats, all_gather_object
from ds_train.train.gpu_health import gpu_health

log = logging.getLogger(__name__)


def linear_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's matrix-product leaves: nn.Linear, and any other leaf with a 2-D weight (GPT-2's
    transformers Conv1D) except embeddings. Leaves only: a wrapper's span would nest its layers'."""
    return [
        m
        for m in model.modules()
        if next(m.children(), None) is None
        and not isinstance(m, torch.nn.Embedding)
        and (isinstance(m, torch.nn.Linear) or _weight_dims(m) == 2)
    ]


def _weight_dims(module: torch.nn.Module) -> int:
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        return 0
    return len(getattr(weight, "ds_shape", None) or weight.shape)  # ZeRO-3 keeps the full shape in ds_shape


class ForwardClock:
    """Sums this rank's forward time between two `take()`s: `with clock:` around each forward, or,
    after `time_linear_layers(model)`, the training forwards of the model's linear layers."""

    def __init__(self, device: torch.device, enabled: bool = True):
        self.enabled = enabled  # off on one rank: nothing to compare it with
        self._cuda = device.type == "cuda"
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._seconds = 0.0
        self._t0 = 0.0
        self.by_layer = False

    def time_linear_layers(self, model: torch.nn.Module) -> int:
        """Time each linear layer's training forward instead of the `with` blocks; the hooks go
        after any already registered (DeepSpeed's), so a ZeRO-3 parameter fetch is done before the
        clock starts. Returns the number of layers timed (0: the `with` blocks stay, and a warning)."""
        layers = linear_layers(model)
        # under torch.compile the hooks stay outside the graph, as DeepSpeed's own (wrapped here, not
        # at import: torch.compiler imports dynamo, a second of start-up for commands that never train)
        start, stop = torch.compiler.disable(self._start), torch.compiler.disable(self._stop)
        for layer in layers:
            layer.register_forward_pre_hook(lambda module, args: start() if module.training else None)
            layer.register_forward_hook(lambda module, args, out: stop() if module.training else None)
        self.by_layer = bool(layers)
        if not layers:
            log.warning(
                "no linear layers to time in %s: the straggler clock times whole forwards",
                type(model).__name__,
            )
        return len(layers)

    def _start(self) -> None:
        if self._cuda:
            if len(self._events) >= 512:  # timed by layer, long intervals pile up events: fold the done ones
                self._fold_finished()
            start = torch.cuda.Event(enable_timing=True)
            start.record()
            self._events.append((start, torch.cuda.Event(enable_timing=True)))
        else:
            self._t0 = time.perf_counter()

    def _stop(self) -> None:
        if self._cuda:
            self._events[-1][1].record()
        else:
            self._seconds += time.perf_counter() - self._t0

    def __enter__(self) -> ForwardClock:
        if self.enabled and not self.by_layer:
            self._start()
        return self

    def __exit__(self, *exc) -> None:
        if self.enabled and not self.by_layer:
            self._stop()

    def _fold_finished(self) -> None:
        """Add up the pairs the device has finished (query() does not wait), oldest first."""
        done = 0
        for start, end in self._events:
            if not end.query():
                break
            self._seconds += start.elapsed_time(end) / 1000
            done += 1
        del self._events[:done]

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
    returns the metrics.jsonl fields, and has rank 0 warn when the same rank's forwards took
    `warn_ratio` × the other ranks' median or more in two log intervals in a row (a single one is
    as likely a passing burst: a GC pause, a neighbour's job), and say when it keeps pace again."""

    def __init__(self, device: torch.device, rank: int, world_size: int, warn_ratio: float, engine=None):
        self.clock = ForwardClock(device, enabled=world_size > 1)
        self.device, self.rank, self.world_size, self.warn_ratio = device, rank, world_size, warn_ratio
        if world_size > 1 and getattr(engine, "zero_optimization_stage", lambda: 0)() == 3:
            # a ZeRO-3 forward gathers parameters from every rank: time the layers between gathers
            self.clock.time_linear_layers(engine.module)
        self._hosts: list[str] | None = None
        self._over: tuple[int, int] | None = None  # (rank, since step): over the ratio, not yet warned
        self._flagged: int | None = None  # the rank warned about, while it stays over the ratio

    def host(self, rank: int) -> str:
        if self._hosts is None:  # gathered at the first log step, by every rank alike
            import socket

            self._hosts = all_gather_object(socket.gethostname())
        return self._hosts[rank]

    def interval(self, steps: int, first_step: int, last_step: int, data_wait_s: float = 0.0) -> dict:
        """This interval's fields; {} on one rank (nothing to compare). `data_wait_s`: this rank's
        loader wait in the interval, to name the rank the others wait for when input stalls."""
        seconds = self.clock.take()
        if self.world_size < 2:
            return {}
        rows = all_gather_floats([seconds / steps, data_wait_s, *gpu_health(self.device)], self.device)
        if len(rows) < 2:  # no process group (a stand-in context)
            return {}
        skew = rank_skew([row[0] for row in rows])
        host = self.host(skew.slowest_rank)
        fields = {
            "forward_s": skew.others_s,  # a typical rank's (the median of all but the slowest)
            "slowest_rank": skew.slowest_rank,
            "slowest_rank_host": host,
            "slowest_forward_s": skew.slowest_s,
            "slowest_forward_ratio": skew.ratio,
            **_health_fields(rows, skew.slowest_rank),
            "data_wait_rank": max(range(len(rows)), key=lambda r: rows[r][1]),
        }
        if self.rank == 0:
            self._warn(skew, host, first_step, last_step, fields)
        return fields

    def _warn(self, skew: RankSkew, host: str, first_step: int, last_step: int, fields: dict) -> None:
        rank = skew.slowest_rank
        if not (self.warn_ratio and skew.ratio >= self.warn_ratio):
            if self._flagged is not None:
                log.info(
                    "rank %d keeps pace again in steps %d-%d (%.2fx)",
                    self._flagged,
                    first_step,
                    last_step,
                    skew.ratio,
                )
            self._over = self._flagged = None
            return
        if self._over is None or self._over[0] != rank:
            self._over = (rank, first_step)  # the first interval over the ratio: wait for a second
        elif self._flagged != rank:
            log.warning(
                "rank %d on %s is a straggler: its forwards took %.2fx the other ranks' median in steps %d-%d "
                "(%.1f vs %.1f ms per step), over %gx since step %d%s; every rank waits for it at each "
                "gradient reduction (a throttled or failing GPU, another job on the node? "
                "docs/performance.md 'Stragglers')",
                rank,
                host,
                skew.ratio,
                first_step,
                last_step,
                1e3 * skew.slowest_s,
                1e3 * skew.others_s,
                self.warn_ratio,
                self._over[1],
                _describe_gpu(fields),
            )
            self._flagged = rank


def _health_fields(rows: list[list[float]], slowest: int) -> dict:
    """The slowest rank's GPU clock, temperature and power, and the others' median clock (where
    NVML answered: none on CPU)."""
    clock, temperature, power = rows[slowest][2:]
    if math.isnan(clock):
        return {}
    others = [row[2] for r, row in enumerate(rows) if r != slowest and not math.isnan(row[2])]
    return {
        "slowest_rank_sm_clock_mhz": clock,
        "sm_clock_mhz": statistics.median(others) if others else None,
        # None, not NaN, for a reading the board did not give: metrics.jsonl stays strict JSON
        "slowest_rank_temperature_c": None if math.isnan(temperature) else temperature,
        "slowest_rank_power_w": None if math.isnan(power) else power,
    }


def _describe_gpu(fields: dict) -> str:
    if "slowest_rank_sm_clock_mhz" not in fields:
        return ""
    others, temperature, power = (
        fields["sm_clock_mhz"],
        fields["slowest_rank_temperature_c"],
        fields["slowest_rank_power_w"],
    )
    return (
        f"; its GPU: SM clock {fields['slowest_rank_sm_clock_mhz']:.0f} MHz"
        + (f" (the others' median {others:.0f})" if others is not None else "")
        + (f", {temperature:.0f} °C" if temperature is not None else "")
        + (f", {power:.0f} W" if power is not None else "")
    )
