"""The record of one log interval (a metrics.jsonl line): losses, throughput, MFU, memory, the
slowest rank's input stall, stragglers and time accounting, reduced over ranks (collective: every
rank computes it at the same step; rank 0 emits it)."""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

import torch

from ds_train.distributed.engine import all_reduce_max, all_reduce_sum
from ds_train.train.memory_stats import device_memory, host_peak_rss_gib

if TYPE_CHECKING:
    from ds_train.train.trainer import Trainer


def interval_record(
    t: Trainer, pending: list[torch.Tensor], interval_start: float, waited: float, side: dict
) -> dict:
    """`pending`: the interval's steps, each [this rank's loss sum, global target tokens, the
    global gradient norm (NaN: none), this rank's z-loss sum];
    `waited`: this rank's seconds in the loader; `side`: evaluation and save seconds, paused out."""
    elapsed = time.perf_counter() - interval_start - side["eval_s"] - side["save_s"]
    stacked = torch.stack(pending)  # [steps, (local loss sum, global targets, grad norm, local z-loss)]
    # one sum for the interval's losses, the skipped-sample count and a mixture's per-source sums,
    # one max for the wait
    skipped = torch.tensor([float(t.skipped_samples)], device=stacked.device)
    per_source = t.source_losses.pending() if t.source_losses is not None else skipped.new_zeros(0)
    own = torch.cat([stacked[:, 0], stacked[:, 3].sum().reshape(1), skipped]).double()
    sums = all_reduce_sum(torch.cat([own, per_source.double()]))
    sums, source_sums = sums[: len(own)], sums[len(own) :]
    losses, z_sum, skipped_samples = sums[:-2], sums[-2], int(sums[-1])
    # Maxima over ranks. The slowest rank's loader wait: every rank waits for it at the next
    # collective, so its stall is the job's (a rank on a slow disk shows, not only rank 0's).
    # Memory: the fullest rank is the one that runs out.
    # The interval's largest gradient norm (the same on every rank) rides along: a spike inside
    # the interval showed nowhere, the record kept the last step's (pretraining audit).
    memory = {**device_memory(t.ctx.device), "host_peak_rss_gib": host_peak_rss_gib()}
    norms = stacked[:, 2].double()
    norm_max = torch.where(norms.isnan(), -1.0, norms).max().reshape(1)  # -1: no norm in the interval
    local = torch.tensor([waited, *memory.values()], dtype=torch.float64, device=t.ctx.device)
    maxima = all_reduce_max(torch.cat([local, norm_max.to(local.device)])).tolist()
    largest_norm = maxima.pop()
    grad_norm_max = largest_norm if largest_norm >= 0 else None
    # Clamped to this rank's interval: a rank's loader time overlapping rank 0's logging
    # (paused out of rank 0's clock) must not read as more than the whole step.
    slowest_wait, memory = min(maxima[0], elapsed), dict(zip(memory, maxima[1:], strict=True))
    if "alloc_retries" in memory:
        memory["alloc_retries"] = int(memory["alloc_retries"])
    targets = stacked[:, 1].double().sum().clamp(min=1)
    loss = float(losses.sum() / targets)
    # the interval's worst step (each step's loss over its own targets): from the same reduced sums
    loss_max = float((losses / stacked[:, 1].double().clamp(min=1)).max())
    steps = len(pending)
    # the interval's samples (a batch-size ramp's steps take fewer)
    tokens = t.layout.schedule.samples_between(t.step - steps, t.step) * t.s.seq_len
    tps = tokens / max(elapsed, 1e-9)
    grad_norm = t.engine.get_global_grad_norm()
    record = {
        "step": t.step,
        "loss": loss,
        "lr": t._step_lr,  # the rate the interval's last step trained with
        "grad_norm": float(grad_norm) if grad_norm is not None else None,
        "loss_max": loss_max,
        # model.z_loss: its term per target token, beside (not in) the cross-entropy `loss`
        **({"z_loss": float(z_sum / targets)} if t.objective_z_loss else {}),
        "grad_norm_max": grad_norm_max,
        # trained so far, this run's batch size since the resume and the checkpoint's count before
        # it (after run.force_resume with another global_batch_size, step × batch is not that)
        "tokens": t.samples_trained() * t.s.seq_len,
        "samples": t.samples_trained(),
        "global_batch_size": t.layout.at(t.step - 1).global_batch_size,  # the last step's (train.batch_ramp)
        "tokens_per_s": tps,
        "tokens_per_s_per_device": tps / t.ctx.world_size,
        "step_time_s": elapsed / steps,
        "data_wait_s": slowest_wait / steps,
        "data_wait_frac": slowest_wait / max(elapsed, 1e-9),
        "mfu": None,
        "world_size": t.ctx.world_size,
        "nonfinite_steps": t.nonfinite.steps,
        "skipped_steps": t.spikes.skipped_steps,  # updates skipped on a spike (train.skip_spike_sigma)
        "skipped_samples": skipped_samples,
        **memory,
        # which rank is slowest (ds_train/train/stragglers.py; a collective, so before any rank-0-only work)
        **t.stragglers.interval(steps, t.step - steps + 1, t.step, waited),
        # time accounting (rank 0's clock; ds_train/report/goodput.py): the interval's steps,
        # evaluation and saves since the previous log line, and this process's wall time so far
        "interval_steps": steps,
        **side,
        "elapsed_s": time.monotonic() - t._process_start,
    }
    if not t.last_record:  # this process's first log line
        record["startup_s"] = t._startup_s
    if t.s.flops_per_token and t.s.peak_flops:
        record["mfu"] = t.s.flops_per_token * tps / (t.s.peak_flops * t.ctx.world_size)
    if t.source_losses is not None:
        record.update(t.source_losses.record(source_sums.tolist()))
    record.update(job_identity())
    return record


def job_identity() -> dict:
    """Job identity for operators (Slurm job id and requeue count when under Slurm)."""
    out = {}
    if "SLURM_JOB_ID" in os.environ:
        out["slurm_job_id"] = os.environ["SLURM_JOB_ID"]
        out["slurm_restart_count"] = int(os.environ.get("SLURM_RESTART_COUNT", 0))
    return out
