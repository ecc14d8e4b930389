"""The per-interval figures of metrics.jsonl that are maxima over ranks: `data_wait_s` /
`data_wait_frac` (the slowest rank's loader stall, per step and as a share of the step) and the
memory peaks. The trainer runs here with a stand-in engine and loaders that sleep, so the stall is
known; only lower bounds on time are asserted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ds_train.train.callbacks.progress import format_record
from ds_train.train.memory_stats import GIB, device_memory, host_peak_rss_gib
from tests.helpers import run_on_gloo_ranks
from tests.unit.stand_in_trainer import MICRO, LogRecords, stand_in_batches, stand_in_trainer


def _fit(delay_s: float, rank: int = 0, world: int = 1) -> tuple[list[dict], dict]:
    """The records rank 0 logs (none elsewhere) and this rank's last record."""
    records = LogRecords()
    trainer = stand_in_trainer([records], stand_in_batches(delay_s), rank=rank, world=world)
    assert trainer.fit() == 0
    return records.records, trainer.last_record


def test_the_logged_lr_is_the_one_the_step_trained_with():
    """Step k trains with the scheduler's value before its update (1e-3 × k here); the log used to
    read it after, i.e. the next step's rate (and a last value never trained with)."""
    records, _ = _fit(0.0)
    assert [(r["step"], r["lr"]) for r in records] == [(2, 2e-3), (4, 4e-3), (6, 6e-3)]


def test_every_step_trains_in_training_mode():
    """A model from from_pretrained (every fine-tune) starts in eval mode: dropout was off until the
    first evaluation switched the engine back to train(), and after every resume (fine-tuning audit)."""
    trainer = stand_in_trainer([])
    assert trainer.engine.training is False
    assert trainer.fit() == 0
    assert len(trainer.engine.modes) == 6 * 2 and all(trainer.engine.modes)


@pytest.mark.parametrize("save_final", [True, False])
def test_save_final_decides_the_checkpoint_at_the_end(save_final):
    """train.save_final=false: no checkpoint at max_steps (a benchmark's 1B run wrote ~15 GB)."""
    saved = []
    trainer = stand_in_trainer(
        [], save_every=4, save=lambda *a, **k: saved.append(trainer.step), save_final=save_final
    )
    assert trainer.fit() == 0
    assert saved == ([4, 6] if save_final else [4])


def test_a_slow_loader_shows_as_data_wait_and_a_ready_one_does_not():
    delay = 0.03
    (slow, _), (ready, _) = _fit(delay), _fit(0.0)
    assert [r["step"] for r in slow] == [2, 4, 6]
    assert slow[-1]["host_peak_rss_gib"] > 0.05 and "peak_reserved_gib" not in slow[-1]  # CPU
    for r in slow:
        assert r["data_wait_s"] >= MICRO * delay  # every micro-batch's sleep was waited for
        # the share is the wait over the same interval's step time
        assert r["data_wait_frac"] == pytest.approx(r["data_wait_s"] / r["step_time_s"], rel=1e-6)
        assert "data wait" in format_record(r)
    for r in ready:
        assert r["data_wait_s"] < MICRO * delay
        assert r["data_wait_frac"] < 0.5  # the stand-in step's own sleep is the larger part
    assert "data wait" not in format_record({**ready[-1], "data_wait_frac": 0.001})
    assert "spikes skipped" not in format_record(ready[-1]) and ready[-1]["skipped_steps"] == 0
    assert "spikes skipped 2" in format_record({**ready[-1], "skipped_steps": 2})
    assert "data wait 30% (rank 5)" in format_record(
        {**ready[-1], "data_wait_frac": 0.3, "data_wait_rank": 5}
    )


def _rank_main(rank: int, world: int, out: str) -> None:
    if rank == 1:  # rank 1 reads slowly and holds more host memory
        ballast = torch.ones(256 * 2**20 // 4)  # noqa: F841 - 256 MiB, touched
    own_rss = host_peak_rss_gib()
    records, last = _fit(0.04 if rank == 1 else 0.0, rank=rank, world=world)
    Path(out, str(rank)).write_text(
        json.dumps({"own_rss": own_rss, "waits": [r["data_wait_s"] for r in records], "last": last})
    )


@pytest.mark.distributed
@pytest.mark.slow
def test_the_slowest_ranks_wait_is_what_rank_0_logs(tmp_path):
    run_on_gloo_ranks(_rank_main, 2, str(tmp_path))
    zero, one = (json.loads((tmp_path / str(r)).read_text()) for r in (0, 1))
    assert len(zero["waits"]) == 3 and all(w >= MICRO * 0.04 for w in zero["waits"])
    # rank 0 logs rank 1's larger host peak; both ranks hold the same (reduced) record
    assert one["own_rss"] > zero["own_rss"] + 0.2
    assert zero["last"]["host_peak_rss_gib"] >= one["own_rss"]
    assert zero["last"]["host_peak_rss_gib"] == one["last"]["host_peak_rss_gib"]


def test_cuda_peaks_are_read_per_interval_and_retries_are_shown(monkeypatch):
    stats = {"allocated_bytes.all.peak": 3 * GIB, "reserved_bytes.all.peak": 5 * GIB, "num_alloc_retries": 2}
    resets = []
    monkeypatch.setattr(torch.cuda, "memory_stats", lambda device: stats)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device: resets.append(device))
    cuda = torch.device("cuda", 0)
    mem = device_memory(cuda)
    assert mem == {"peak_allocated_gib": 3.0, "peak_reserved_gib": 5.0, "alloc_retries": 2.0}
    assert resets == [cuda]  # the next interval's peak starts afresh
    assert device_memory(torch.device("cpu")) == {}
    line = format_record({"loss": 1.0, "lr": 1e-3, "tokens_per_s": 10.0, **mem})
    assert "mem 5.0 GiB" in line and "alloc retries 2" in line
    assert "alloc retries" not in format_record(
        {"loss": 1.0, "lr": 1e-3, "tokens_per_s": 10.0, **mem, "alloc_retries": 0}
    )


@pytest.mark.slow
def test_zero0_without_clipping_logs_the_gradient_norm(tmp_path, shards):
    """DeepSpeed computes no norm at stage 0 unless it clips: a grad_clip sweep's unclipped arm
    logged grad_norm null (sweep audit). Unclipped, it equals the norm a run that clips (at a bound
    never reached) logs."""
    from tests.helpers import base_config, read_metrics, run_cli, write_config

    norms = {}
    for clip in (0.0, 1e9):
        run = tmp_path / f"clip{clip:g}"
        cfg = base_config(run, shards, train={"max_steps": 2, "grad_clip": clip}, zero={"stage": 0})
        run_cli(["pretrain", write_config(tmp_path / f"c{clip:g}.yaml", cfg)])
        norms[clip] = [r["grad_norm"] for r in read_metrics(run) if "loss" in r]
    assert all(n is not None and n > 0 for n in norms[0.0])
    assert norms[0.0] == pytest.approx(norms[1e9], rel=1e-5)


@pytest.mark.slow
def test_an_interval_names_its_worst_step(tmp_path, shards):
    """loss_max and grad_norm_max: a spike inside a log interval showed nowhere, the record kept
    the interval's mean loss and its last step's norm (pretraining audit). Logged every 3 steps,
    they are the maxima of what the same run logs step by step."""
    from tests.helpers import base_config, read_metrics, run_cli, write_config

    records = {}
    for every in (1, 3):
        run = tmp_path / f"every{every}"
        cfg = base_config(run, shards, train={"max_steps": 3, "log_every": every, "lr": 1e-2})
        run_cli(["pretrain", write_config(tmp_path / f"e{every}.yaml", cfg)])
        records[every] = [r for r in read_metrics(run) if "loss" in r]
    steps, (interval,) = records[1], records[3]
    assert all(r["loss_max"] == r["loss"] and r["grad_norm_max"] == r["grad_norm"] for r in steps)
    assert interval["loss_max"] == pytest.approx(max(r["loss"] for r in steps), rel=1e-9)
    assert interval["grad_norm_max"] == pytest.approx(max(r["grad_norm"] for r in steps), rel=1e-9)
    assert len({r["grad_norm"] for r in steps}) == 3  # three different norms: the maximum is a choice


@pytest.mark.slow
def test_z_loss_trains_and_is_logged_apart_from_the_loss(tmp_path, shards):
    """model.z_loss: the logged loss stays the cross-entropy (step 1, before any update, equals
    the run without it), z_loss is logged beside it, and the updates differ."""
    from tests.helpers import base_config, read_metrics, run_cli, write_config

    out = {}
    for z in (0.0, 0.01):
        run = tmp_path / f"z{z:g}"
        cfg = base_config(run, shards, train={"max_steps": 2, "lr": 1e-2}, model={"z_loss": z})
        run_cli(["pretrain", write_config(tmp_path / f"z{z:g}.yaml", cfg)])
        out[z] = [r for r in read_metrics(run) if "loss" in r]
    assert out[0.01][0]["loss"] == pytest.approx(out[0.0][0]["loss"], rel=1e-6)
    assert out[0.01][1]["loss"] != pytest.approx(out[0.0][1]["loss"], rel=1e-6)
    assert all(r["z_loss"] > 0 for r in out[0.01]) and "z_loss" not in out[0.0][0]
