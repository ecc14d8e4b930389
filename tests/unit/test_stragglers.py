"""Straggler detection (ds_train/train/stragglers.py): each rank times its forwards, the log step
gathers them, metrics.jsonl names the slowest rank and rank 0 warns once while it stays slow."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import ClassVar

import pytest

from ds_train.train import stragglers
from ds_train.train.gpu_health import HEALTH_KEYS, gpu_health
from ds_train.train.stragglers import ForwardClock, StragglerWatch, rank_skew
from tests.helpers import run_on_gloo_ranks
from tests.unit.stand_in_trainer import (
    COMPUTE_S,
    MICRO,
    ConstantLoss,
    LogRecords,
    stand_in_batches,
    stand_in_trainer,
)


def test_rank_skew_names_the_slowest_rank_against_the_median():
    skew = rank_skew([0.10, 0.30, 0.10, 0.12])
    assert (skew.slowest_rank, skew.slowest_s, skew.others_s) == (1, 0.30, 0.10)
    assert skew.ratio == pytest.approx(3.0)
    assert rank_skew([0.1, 0.3]).ratio == pytest.approx(3.0)  # two ranks: against the other one
    assert rank_skew([0.0, 0.0]).ratio == 1.0  # nothing timed: no straggler


def test_the_clock_counts_only_time_inside_with_and_resets_at_take():
    import torch

    clock = ForwardClock(torch.device("cpu"))
    for _ in range(2):
        with clock:
            time.sleep(0.03)
        time.sleep(0.3)  # outside: not counted
    seconds = clock.take()
    assert 0.06 <= seconds < 0.3
    assert clock.take() == 0.0


def test_by_layer_the_clock_leaves_out_waits_before_a_layer_and_counts_what_runs_inside(caplog):
    import torch
    from transformers.pytorch_utils import Conv1D

    from ds_train.train.callbacks.fault_injection import _slow_down

    model = torch.nn.Sequential(
        torch.nn.Embedding(8, 4), torch.nn.Linear(4, 4), torch.nn.LayerNorm(4), Conv1D(4, 4)
    )
    for layer in (model[1], model[3]):  # registered first, as DeepSpeed's ZeRO-3 parameter fetch
        layer.register_forward_pre_hook(lambda module, args: time.sleep(0.1))  # waiting for other ranks
    clock = ForwardClock(torch.device("cpu"))
    assert clock.time_linear_layers(model) == 2  # the Linear and GPT-2's Conv1D, not embedding or norm
    _slow_down(model, lambda: 0.06)  # the slow fault: 30 ms inside each of the two layers
    x = torch.tensor([[1, 2]])
    with clock:  # timed by layer, a `with` block adds nothing
        model(x)
    assert 0.06 <= clock.take() < 0.2  # with the two 100 ms waits it would be over 0.26
    model.eval()
    model(x)
    assert clock.take() == 0.0  # evaluation forwards are not timed
    assert ForwardClock(torch.device("cpu")).time_linear_layers(torch.nn.LayerNorm(4)) == 0
    assert "no linear layers to time in LayerNorm" in caplog.text


class _FakeEvent:
    """torch.cuda.Event's timing surface: recorded at a fake clock, elapsed_time in ms."""

    now = 0.0
    synchronized: ClassVar[list] = []

    def __init__(self, enable_timing: bool = False):
        assert enable_timing
        self.at = None

    def record(self):
        self.at = _FakeEvent.now

    def synchronize(self):
        _FakeEvent.synchronized.append(self)

    def query(self) -> bool:  # finished: every fake event is, once recorded
        return self.at is not None

    def elapsed_time(self, end) -> float:
        return 1000 * (end.at - self.at)


def test_on_a_gpu_the_clock_reads_cuda_events_at_take(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    clock = ForwardClock(torch.device("cuda", 0))
    for start, end in ((1.0, 1.25), (2.0, 2.5)):
        _FakeEvent.now = start
        with clock:
            _FakeEvent.now = end  # the device's time, not the host's
    assert _FakeEvent.synchronized == []  # nothing waits for the device inside the step
    assert clock.take() == pytest.approx(0.75)
    assert len(_FakeEvent.synchronized) == 1  # the last forward's end, once, at the log step
    assert clock.take() == 0.0
    for _ in range(600):  # more forwards than the clock keeps events for: the finished are folded
        _FakeEvent.now = 0.0
        with clock:
            _FakeEvent.now = 0.001
    assert len(clock._events) < 512
    assert clock.take() == pytest.approx(0.6)


def _watch(monkeypatch, gathered: list[list], warn_ratio: float = 1.2) -> tuple[StragglerWatch, list]:
    """A watch on rank 0 of 3 whose gathers return `gathered`, one entry per log step: each rank's
    forward seconds per step, or its whole row [forward, loader wait, SM clock, temperature, power]."""
    import torch

    queue = list(gathered)

    def rows(values, device):
        return [r if isinstance(r, list) else [r, 0.0, math.nan, math.nan, math.nan] for r in queue.pop(0)]

    monkeypatch.setattr(stragglers, "all_gather_floats", rows)
    monkeypatch.setattr(stragglers, "all_gather_object", lambda obj: ["node-a", "node-b", "node-c"])
    return StragglerWatch(torch.device("cpu"), 0, 3, warn_ratio), queue


def test_rank_0_warns_when_a_rank_straggles_twice_in_a_row_and_says_when_it_recovers(monkeypatch, caplog):
    gathered = [[0.2, 0.2, 0.2], [0.2, 0.5, 0.2], [0.2, 0.6, 0.2], [0.2, 0.6, 0.2], [0.2, 0.2, 0.21]]
    watch, _ = _watch(monkeypatch, gathered)
    caplog.set_level(logging.INFO, logger=stragglers.__name__)
    fields = [watch.interval(2, 2 * i + 1, 2 * i + 2) for i in range(len(gathered))]
    assert fields[1] == {
        "forward_s": 0.2,  # ranks 0 and 2
        "slowest_rank": 1,
        "slowest_rank_host": "node-b",
        "slowest_forward_s": 0.5,
        "slowest_forward_ratio": 2.5,
        "data_wait_rank": 0,  # no rank waited: the first
    }  # no GPU clock fields: NVML said nothing
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1  # at the second interval over the ratio (steps 5-6), and once only
    assert warnings[0].startswith(
        "rank 1 on node-b is a straggler: its forwards took 3.00x the other ranks' median in steps 5-6 "
        "(600.0 vs 200.0 ms per step), over 1.2x since step 3; every rank waits"
    )
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert infos == ["rank 1 keeps pace again in steps 9-10 (1.05x)"]
    assert fields[4]["slowest_rank"] == 2


def test_one_interval_over_the_ratio_is_not_warned_about(monkeypatch, caplog):
    watch, _ = _watch(monkeypatch, [[0.2, 0.5, 0.2], [0.2, 0.2, 0.2], [0.6, 0.2, 0.2], [0.2, 0.2, 0.6]])
    caplog.set_level(logging.INFO, logger=stragglers.__name__)
    for i in range(4):  # rank 1 once, then rank 0 and rank 2 once each: no rank twice in a row
        watch.interval(1, i + 1, i + 1)
    assert not caplog.records


def test_no_warning_with_ratio_0_but_the_fields_are_logged(monkeypatch, caplog):
    watch, _ = _watch(monkeypatch, [[0.2, 0.9, 0.2]], warn_ratio=0)
    assert watch.interval(1, 1, 1)["slowest_rank"] == 1
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_the_slow_ranks_gpu_clock_is_logged_and_shown_in_the_warning(monkeypatch, caplog):
    fast, slow = [0.2, 0.0, 1980.0, 61.0, 500.0], [0.5, 0.0, 1410.0, 84.0, 310.0]
    other = [0.2, 0.3, 1975.0, 60.0, 505.0]  # the rank whose loader the others wait for
    watch, _ = _watch(monkeypatch, [[fast, slow, other]] * 2)
    fields = [watch.interval(1, i + 1, i + 1) for i in range(2)][-1]
    assert {k: v for k, v in fields.items() if "clock" in k or "temperature" in k or "power" in k} == {
        "slowest_rank_sm_clock_mhz": 1410.0,
        "sm_clock_mhz": 1977.5,
        "slowest_rank_temperature_c": 84.0,
        "slowest_rank_power_w": 310.0,
    }
    assert fields["data_wait_rank"] == 2
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert (
        "since step 1; its GPU: SM clock 1410 MHz (the others' median 1978), 84 °C, 310 W; every" in warning
    )
    # a board that reports its clock but not its power: null in metrics.jsonl, left out of the warning
    watch, _ = _watch(monkeypatch, [[fast, [0.5, 0.0, 1410.0, 84.0, math.nan], other]] * 2)
    caplog.clear()
    fields = [watch.interval(1, i + 1, i + 1) for i in range(2)][-1]
    assert fields["slowest_rank_power_w"] is None and json.loads(json.dumps(fields, allow_nan=False))
    assert "84 °C; every rank waits" in caplog.text


def test_gpu_health_reads_nvml_through_torch_and_is_nan_where_it_cannot(monkeypatch):
    import torch

    cuda = torch.device("cuda", 0)
    asked = []
    monkeypatch.setattr(torch.cuda, "clock_rate", lambda device: asked.append(device) or 1755)
    monkeypatch.setattr(torch.cuda, "temperature", lambda device: 71)
    monkeypatch.setattr(torch.cuda, "power_draw", lambda device: 612_000)  # mW
    assert gpu_health(cuda) == [1755.0, 71.0, 612.0]
    assert asked == [cuda]  # this rank's device, not the current one

    def no_nvml(device):
        raise ModuleNotFoundError("nvidia-ml-py does not seem to be installed")

    monkeypatch.setattr(torch.cuda, "clock_rate", no_nvml)
    assert gpu_health(cuda)[1:] == [71.0, 612.0]  # the others are still read
    monkeypatch.setattr(torch.cuda, "temperature", no_nvml)
    monkeypatch.setattr(torch.cuda, "power_draw", no_nvml)
    assert all(math.isnan(v) for v in gpu_health(cuda))
    assert all(math.isnan(v) for v in gpu_health(torch.device("cpu")))
    assert len(gpu_health(cuda)) == len(HEALTH_KEYS)  # every rank gathers the same shape


def test_one_rank_logs_no_straggler_fields():
    records = LogRecords()
    stand_in_trainer([records]).fit()
    assert records.records and not any("slowest_rank" in r for r in records.records)


class _SlowLoss(ConstantLoss):
    def __init__(self, delay_s: float):
        self.delay_s = delay_s

    def loss_sum(self, engine, batch):
        time.sleep(self.delay_s)
        return super().loss_sum(engine, batch)


DELAY_S = 0.04  # rank 1's extra forward time per micro-batch


def _rank_main(rank: int, world: int, out: str) -> None:
    records = LogRecords()
    # rank 1 computes slowly, rank 0 reads its batches slowly: each is named for its own stall
    trainer = stand_in_trainer(
        [records], stand_in_batches(DELAY_S if rank == 0 else 0.0), rank=rank, world=world
    )
    trainer.objective = _SlowLoss(DELAY_S if rank == 1 else 0.0)
    with_logs = []
    handler = logging.Handler()
    handler.emit = lambda record: with_logs.append(record.getMessage())
    logging.getLogger(stragglers.__name__).addHandler(handler)
    trainer.fit()
    (Path(out) / str(rank)).write_text(
        json.dumps({"records": records.records, "last": trainer.last_record, "logs": with_logs})
    )


@pytest.mark.distributed
@pytest.mark.slow
def test_a_rank_with_slow_forwards_is_named_in_the_metrics_and_warned_about(tmp_path):
    run_on_gloo_ranks(_rank_main, 2, str(tmp_path))
    zero, one = (json.loads((tmp_path / str(r)).read_text()) for r in (0, 1))
    assert [r["step"] for r in zero["records"]] == [2, 4, 6]
    for r in zero["records"]:
        # rank 1's forwards: its sleep alone is MICRO × DELAY_S per step; rank 0's take almost no
        # time. Timing the whole step instead would show both ranks alike (they wait for each other).
        assert r["slowest_rank"] == 1 and r["slowest_forward_ratio"] > 3
        assert r["slowest_forward_s"] >= MICRO * DELAY_S
        assert r["forward_s"] < COMPUTE_S  # rank 0's: its engine step (COMPUTE_S) is not in it
        assert r["data_wait_rank"] == 0 and r["data_wait_s"] >= MICRO * DELAY_S
    # every rank computes the same fields from the same gathered numbers
    assert {k: one["last"][k] for k in ("slowest_rank", "forward_s")} == {
        k: zero["last"][k] for k in ("slowest_rank", "forward_s")
    }
    warned = [m for m in zero["logs"] if "is a straggler" in m]
    # at the second interval over the ratio
    assert len(warned) == 1 and warned[0].startswith("rank 1 on ") and "in steps 3-4" in warned[0], warned
    assert "since step 1" in warned[0]
    assert not [m for m in one["logs"] if "is a straggler" in m]  # rank 0 speaks for the job
