"""The training loop shared by pretraining and fine-tuning.

One optimizer step = `grad_accum` micro-batches on each rank (fewer in a `train.batch_ramp`
stage). The loss that is back-propagated is each micro-batch's *summed* token loss divided by the
token count of the whole global batch (all-reduced before the first forward), times the
data-parallel size that DeepSpeed divides by.
So every target token weighs the same whatever the micro-batch size, accumulation or world size,
and 1 rank with 2× accumulation matches 2 ranks step for step.

Each step costs one small all-reduce of our own: the global token count, travelling with the
flags all ranks must agree on (a stop request, a non-finite loss in the previous step). Losses are
reduced only at log steps.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch

from ds_train.checkpoint.layout import latest_checkpoint, tag_for_step
from ds_train.checkpoint.manager import CheckpointManager
from ds_train.distributed.deepspeed_config import BatchLayout
from ds_train.distributed.engine import DistributedContext, all_reduce_sum, gate_optimizer_step
from ds_train.distributed.peers import is_collective_failure, lost_contact
from ds_train.errors import RunFailure
from ds_train.model.init import module_seed
from ds_train.train.best_metric import BestMetric
from ds_train.train.callbacks.base import Callback
from ds_train.train.evaluation import evaluation_record
from ds_train.train.interval_record import interval_record
from ds_train.train.nonfinite import NonFiniteLosses
from ds_train.train.per_layer_norms import PerLayerNorms
from ds_train.train.process_clock import process_age_s
from ds_train.train.settings import TrainerSettings
from ds_train.train.source_losses import SourceLosses
from ds_train.train.spike_guard import SpikeGuard
from ds_train.train.stragglers import StragglerWatch

log = logging.getLogger(__name__)

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: checkpointed on a signal; the batch script requeues
INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT: checkpointed on Ctrl-C, the status a shell expects


def step_seed(seed: int, step: int, rank: int) -> int:
    return module_seed(seed, f"step {step} rank {rank}")


class Trainer:
    def __init__(
        self,
        *,
        settings: TrainerSettings,
        ctx: DistributedContext,
        engine: Any,
        objective: Any,
        layout: BatchLayout,
        train_batches: Iterable[dict],
        checkpoints: CheckpointManager,
        state_fn: Callable[[int], dict],
        config_yaml: str,
        start_step: int = 0,
        write_extras: Callable[[Any], None] | None = None,
        eval_batches: Callable[[], Iterable[dict]] | None = None,
        describe_sample: Callable[[int, int, int], str] | None = None,
        eval_set_names: list[str] | None = None,
        train_set_names: list[str] | None = None,
        callbacks: list[Callback] | None = None,
        resumed: dict | None = None,
        downstream: Callable[[Any, Callable[[dict], dict]], dict] | None = None,
    ):
        self.s = settings
        self.ctx, self.engine, self.objective, self.layout = ctx, engine, objective, layout
        self.train_batches = train_batches
        self.eval_batches, self.eval_set_names = eval_batches, eval_set_names
        self.downstream = (
            downstream  # (engine, batch mover) → the multiple-choice tasks' figures (train/downstream.py)
        )
        # `resumed`: the ds_train_state.json of the checkpoint this attempt resumes from
        resumed = resumed or {}
        self.best = BestMetric.from_state(settings.best_metric, resumed.get("best_metric"))
        # the default valid_loss of a run evaluating data.downstream alone: not worth a warning
        # unless keep_best or early stopping act on it (checked before the start then)
        self.best.missing_warned = settings.best_metric == "valid_loss" and not (
            settings.keep_best or settings.early_stopping_patience
        )
        # the step of the last evaluation, and its record: a restart of a finished run (its final
        # checkpoint is written after the final evaluation) evaluates again only if that was lost,
        # and its export still has the evaluation (the model card's results)
        self.evaluated_step: int | None = resumed.get("evaluated_step")
        self.last_eval: dict = resumed.get("last_evaluation") or {}
        self._resumed_record: dict = resumed.get("metrics") or {}
        # a run that ended on early stopping (not one whose patience ran out at max_steps)
        self.stopped_early: bool = resumed.get("stopped_early", True)
        if settings.keep_best:
            checkpoints.keep_step = self.best.best_step
        self.checkpoints, self.state_fn, self.config_yaml = checkpoints, state_fn, config_yaml
        self.write_extras = write_extras
        self.nonfinite = NonFiniteLosses(
            settings.nonfinite,
            settings.max_nonfinite,
            ctx.rank,
            ctx.is_main,
            describe_sample or (lambda src, shard, row: f"source {src} shard {shard} row {row}"),
            checkpoints.root,
        )
        self.spikes = SpikeGuard(
            settings.skip_spike_sigma, settings.skip_spike_window, ctx.is_main, resumed.get("spike_guard")
        )
        if self.spikes.enabled:
            gate_optimizer_step(engine, self.spikes.allow)
        self.per_layer_norms = (
            PerLayerNorms(settings.per_layer_norms_every, engine.module, ctx.rank, ctx.device)
            if settings.per_layer_norms_every
            else None
        )
        self.callbacks = callbacks or []
        # a mixture's training loss per source (`loss/<name>`), summed on the device between log lines
        self.source_losses = SourceLosses(train_set_names, ctx.device) if train_set_names else None
        self.step = self.start_step = start_step
        # samples trained before start_step (the checkpoint's count: batches may have differed;
        # before 2026-12-07 only the stream position was saved, the same count unless forced)
        self.start_samples: int | None = resumed.get("trained_samples", resumed.get("consumed_samples"))
        self.last_saved_step = start_step if start_step else -1
        self.stop_reason: str | None = None
        self.last_record: dict = {}
        self._unchecked: tuple[list[dict], torch.Tensor] | None = None  # last step, finiteness not yet agreed
        self.skipped_samples = 0  # rows the loader could not read and replaced (data.skip_corrupt)
        self._activity: str | None = None  # what a collective failure interrupted, if not a step
        self._process_start = time.monotonic() - process_age_s()  # this process's start, monotonic
        self._startup_s: float | None = None
        self._step_lr = 0.0  # the learning rate of the last step taken
        self._writes_busy = False  # some rank's background checkpoint writes were running at the last step
        self.stragglers = StragglerWatch(
            ctx.device, ctx.rank, ctx.world_size, settings.straggler_ratio, engine
        )

    # --- public -------------------------------------------------------------------------------

    def request_stop(self, reason: str) -> None:
        """Checkpoint and stop at the next step boundary (called from signal handlers)."""
        self.stop_reason = reason

    def fit(self) -> int:
        """Train to max_steps; returns the process exit code (0, PREEMPTED_EXIT_CODE, or
        INTERRUPTED_EXIT_CODE after a checkpoint on Ctrl-C).

        A collective that fails because a peer died or hung becomes RankLostError, naming the
        ranks that did not answer a roll call."""
        try:
            return self._fit()
        except BaseException as e:
            self.checkpoints.abandon()  # a pending background save: its writes would delay the exit
            if isinstance(e, RunFailure) or not isinstance(e, RuntimeError) or not is_collective_failure(e):
                self._emit_error(e)
                raise
            # the roll call first: peers wait for this rank's answer only seconds
            lost = lost_contact(
                e,
                self.s.collective_timeout_s,
                self._activity or f"in step {self.step + 1}",
                latest_checkpoint(self.checkpoints.root),
            )
        self._emit_error(lost)
        raise lost from None

    def _fit(self) -> int:
        self._emit("on_train_start")
        # Training mode before the first step, not only after an evaluation: from_pretrained (every
        # fine-tune, model.init_from) returns the model in eval mode, so dropout (the model's and
        # LoRA's) was off until the first evaluation, for the whole run without one, and again
        # after each resume, which then differed from the uninterrupted run (fine-tuning audit).
        self.engine.train()
        batches = iter(self.train_batches)
        pending: list[torch.Tensor] = []
        interval_start = time.perf_counter()
        waited = 0.0  # seconds this rank spent in the loader during the interval (an input stall)
        # evaluation and checkpoint time since the last log line: paused out of the interval's clock
        side = {"eval_s": 0.0, "save_s": 0.0}
        # still stopped under this start's patience (a raised one trains on)
        self.stopped_early = stopped_early = (
            self.step > 0 and self.stopped_early and self.best.exhausted(self.s.early_stopping_patience)
        )
        if stopped_early and self.ctx.is_main:  # a restart of a run that stopped early
            log.info(
                "this run stopped early at step %d (train.early_stopping_patience=%d): nothing to train; "
                "raise the patience, or set it to 0, to train on",
                self.step,
                self.s.early_stopping_patience,
            )
        while not stopped_early and self.step < self.s.max_steps:
            if self._startup_s is None:  # imports, process group, model, checkpoint, engine, data plan
                self._startup_s = time.monotonic() - self._process_start
            self._emit("on_step_start")
            t0 = time.perf_counter()
            micro = [next(batches) for _ in range(self.layout.at(self.step).grad_accum)]
            waited += time.perf_counter() - t0
            if int(micro[0]["step"]) != self.step:  # the data position travels with the batch
                raise RuntimeError(f"data loader is at step {int(micro[0]['step'])}, trainer at {self.step}")
            local_targets = torch.stack([b["num_targets"] for b in micro]).sum()
            global_targets, stop = self._agree(local_targets)
            if self.checkpoints.pending is not None and not self._writes_busy:  # every rank's files written
                t0 = time.perf_counter()
                self._finish_save()
                side["save_s"] += time.perf_counter() - t0
            if stop:  # every rank agreed, so every rank logs the steps since the last log line
                if pending:
                    self._log(pending, interval_start, waited, side)
                return self._stop_for_requeue()
            self.skipped_samples += sum(int(b["skipped"]) for b in micro if "skipped" in b)
            self._step_lr = float(self.engine.get_lr()[0])  # this step's; the scheduler moves on in it
            # The step's random draws (dropout) from (run.seed, step, rank) alone, seeded after the
            # batches are fetched: whatever drew from the global generator before (a DataLoader
            # iterator's base seed at its first batch, an evaluation's loader; a resumed attempt
            # makes those draws at other steps) cannot shift them, so a resume trains exactly as
            # the uninterrupted run did. Host-side bookkeeping: no device sync.
            torch.manual_seed(step_seed(self.s.seed, self.step, self.ctx.rank))
            losses, z_sum = self._train_step(micro, global_targets)
            self.step += 1
            self._unchecked = (micro, losses)
            pending.append(torch.stack([losses.sum(), global_targets, self._grad_norm(losses), z_sum]))
            self._emit("on_step_end")
            if self.step % self.s.log_every == 0 or self.step == self.s.max_steps:
                self._log(pending, interval_start, waited, side)
                pending, interval_start, waited = [], time.perf_counter(), 0.0
                side = dict.fromkeys(side, 0.0)
            if self.step < self.s.max_steps:
                t0 = time.perf_counter()
                evaluates = bool(self.s.eval_every and self.step % self.s.eval_every == 0)
                if evaluates:
                    self.evaluate()
                t1 = time.perf_counter()
                # decided at an evaluation (as the transformers Trainer's callback is: a run extended
                # past an exhausted patience trains to its next one) and before this step's save,
                # whose state records it; every rank decides alike, from the same record
                self.stopped_early = evaluates and self.best.exhausted(self.s.early_stopping_patience)
                if self.s.save_every and self.step % self.s.save_every == 0:
                    self.save(background=self.s.save_async)
                side["eval_s"] += t1 - t0
                side["save_s"] += time.perf_counter() - t1
                if self.stopped_early:
                    if pending:
                        self._log(pending, interval_start, waited, side)
                    self._say_early_stop()
                    break
        if self.evaluated_step != self.step:
            self.evaluate()
        self._finish_save()
        if self.s.save_final and self.last_saved_step != self.step:
            self.save()
        self._say_best()
        self._emit("on_train_end")
        return 0

    @property
    def objective_z_loss(self) -> float:
        """model.z_loss of the objective (0: none, or an objective without one)."""
        return getattr(self.objective, "z_loss", 0.0)

    @property
    def final_record(self) -> dict:
        """The last train record: this attempt's, or, where it trained nothing (a restart of a
        finished run), the checkpoint's."""
        return self.last_record or self._resumed_record

    def samples_trained(self, step: int | None = None) -> int:
        """Samples trained up to `step` (default: now), across resumes with other batch sizes."""
        step = self.step if step is None else step
        batches = self.layout.schedule
        if self.start_samples is None:  # a fresh start, or a checkpoint from before the count
            return batches.samples_between(0, step)
        return self.start_samples + batches.samples_between(self.start_step, step)

    def _say_early_stop(self) -> None:
        if self.ctx.is_main:
            log.info(self.best.stop_message(self.step))

    def _say_best(self) -> None:
        if self.ctx.is_main and self.best.best is not None:
            log.info(self.best.summary(self.checkpoints.root / tag_for_step(self.best.best_step)))

    def _stop_for_requeue(self) -> int:
        self._finish_save()
        if self.last_saved_step != self.step:
            self.save()
        if self.stop_reason == "SIGINT":  # Ctrl-C at a terminal: the user stopped it, not a scheduler
            log.warning(
                "interrupted at step %d after checkpointing it; re-run the same command to resume",
                self.step,
            )
            self._emit("on_train_end")
            return INTERRUPTED_EXIT_CODE
        log.warning(
            "stopped at step %d (%s) after checkpointing; exit %d so the job is requeued",
            self.step,
            self.stop_reason,
            PREEMPTED_EXIT_CODE,
        )
        self._emit("on_train_end")
        return PREEMPTED_EXIT_CODE

    def save(self, background: bool = False) -> None:
        """Checkpoint this step; with `background` the files are written while training goes on and
        the checkpoint completes at the first step boundary after every rank's writes are done."""
        self._agree(torch.zeros(()))  # never checkpoint a step whose loss no rank has vetted
        self._finish_save()
        self._activity = f"while saving the checkpoint of step {self.step}"
        self.checkpoints.save(
            self.engine,
            self.step,
            self.state_fn(self.step),
            self.config_yaml,
            self.write_extras,
            on_written=lambda directory, step=self.step: self._emit("on_checkpoint_written", directory, step),
            background=background,
        )
        if self.checkpoints.pending is None:  # written, not left to the background
            self.last_saved_step = self.step
        self._activity = None

    def _finish_save(self) -> None:
        """Complete a background save (collective: every rank calls it at the same step)."""
        pending = self.checkpoints.pending
        if pending is None:
            return
        self._activity = f"while completing the checkpoint of step {pending.step}"
        self.checkpoints.finish()
        self.last_saved_step = pending.step
        self._activity = None

    def evaluate(self) -> dict | None:
        if self.eval_batches is None and self.downstream is None:
            return None
        self.engine.eval()
        self._activity = f"while evaluating after step {self.step}"
        record = {}
        if self.eval_batches is not None:
            record = evaluation_record(
                self.engine,
                self.objective,
                self.eval_batches(),
                self._to_device,
                self.ctx.device,
                self.eval_set_names,
            )
        if self.downstream is not None:
            record.update(self.downstream(self.engine, self._to_device))
        self.engine.train()
        self._activity = None
        record = {"step": self.step, **record}
        self.evaluated_step, self.last_eval = self.step, record
        if self.best.update(record, self.step) and self.s.keep_best:
            self.checkpoints.keep_best_step(self.step)  # pruning spares it (if this step gets saved)
        if self.ctx.is_main:
            self._emit("on_eval", record)
        return record

    # --- internals ----------------------------------------------------------------------------

    def _train_step(
        self, micro: list[dict], global_targets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed loss of each micro-batch (so a non-finite one can be named), and the step's
        z-loss sum (model.z_loss; trained on, logged apart from the loss)."""
        scale = self.ctx.world_size / global_targets.clamp(min=1)
        losses = torch.zeros(len(micro), device=self.ctx.device)
        z_sum = torch.zeros((), device=self.ctx.device)
        for k, batch in enumerate(micro):
            last = k == len(micro) - 1  # the update runs in this micro-batch's engine.step()
            if self.layout.ramp:  # DeepSpeed counts micro-batches in its configured (final) accumulation
                self.engine.set_gradient_accumulation_boundary(last)
            batch = self._to_device(batch)
            with self.stragglers.clock:
                loss_sum = self.objective.loss_sum(self.engine, batch)
            if self.source_losses is not None:
                self.source_losses.add(batch)
            self.engine.backward(loss_sum * scale, scale_wrt_gas=False)
            z_term = batch.get("z_loss")
            if z_term is not None:
                z_sum += z_term
                loss_sum = loss_sum.detach() - z_term
            losses[k] = loss_sum.detach()
            if self.spikes.enabled and last:
                step_loss = all_reduce_sum(losses.sum().reshape(1))[0] / global_targets.clamp(min=1)
                self.spikes.arm(self.step + 1, step_loss)
            if self.per_layer_norms and last and self.per_layer_norms.due(self.step + 1):
                self.per_layer_norms.measure(self.engine)  # the reduced gradients, before the update
            self.engine.step()
        return losses, z_sum

    def _agree(self, local_targets: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """The step's one collective: the global target-token count, whether any rank wants to stop,
        whether any rank saw a non-finite loss in the previous step (checked here, a step late,
        so the loop never waits on a loss value; DeepSpeed's ZeRO optimizers already discarded
        that step's update because its gradient norm was not finite), and whether any rank is
        still writing a background checkpoint (`_writes_busy`)."""
        unchecked, self._unchecked = self._unchecked, None
        bad = (~torch.isfinite(unchecked[1])).any().float() if unchecked is not None else torch.zeros(())
        flags = torch.stack(
            [
                local_targets.float().to(self.ctx.device),
                torch.tensor(float(self.stop_reason is not None), device=self.ctx.device),
                bad.to(self.ctx.device),
                torch.tensor(float(self.checkpoints.writing()), device=self.ctx.device),
            ]
        )
        all_reduce_sum(flags)
        _, stop, nonfinite, self._writes_busy = (flags > 0).tolist()
        if nonfinite:
            # every rank is here (the flag is all-reduced): a pending checkpoint of a vetted step
            # is completed first, in case train.nonfinite stops the run
            self._finish_save()
            self.nonfinite.seen(self.step, *unchecked)
        elif unchecked is not None:
            self.nonfinite.finite()
        if stop and self.stop_reason is None:
            self.stop_reason = "another rank received a stop signal"
        return flags[0], stop

    def _grad_norm(self, like: torch.Tensor) -> torch.Tensor:
        """This step's global gradient norm (before clipping) as a device scalar, NaN where
        DeepSpeed has none: kept per step for the interval's maximum, with no host sync."""
        norm = self.engine.get_global_grad_norm()
        if torch.is_tensor(norm):  # copied: the engine may overwrite its own in place next step;
            # on the loss's device: with optimizer offload DeepSpeed's norm is a CPU tensor
            return norm.detach().reshape(()).to(device=like.device, dtype=like.dtype, copy=True)
        value = float("nan") if norm is None else float(norm)
        return torch.tensor(value, dtype=like.dtype, device=like.device)

    def _log(self, pending: list[torch.Tensor], interval_start: float, waited: float, side: dict) -> None:
        record = interval_record(self, pending, interval_start, waited, side)
        if self.per_layer_norms:
            record.update(self.per_layer_norms.take())
        self.last_record = record
        if self.ctx.is_main:
            self._emit("on_log", record)

    def _to_device(self, batch: dict) -> dict:
        return {
            k: v.to(self.ctx.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()
        }

    def _emit(self, hook: str, *args) -> None:
        for cb in self.callbacks:
            getattr(cb, hook)(self, *args)

    def _emit_error(self, error: BaseException) -> None:
        for cb in self.callbacks:
            try:
                cb.on_train_error(self, error)
            except Exception:  # the training error is the one to report
                log.exception("%s failed while training was ending with an error", type(cb).__name__)
