"""The wiring pretraining and fine-tuning share once model, objective and data exist: the DeepSpeed
engine, checkpoints and resume, the start-up summary, the checkpoint state and the Trainer.

What differs between the two (which model, which data, what a checkpoint must also record) comes
in as `TrainingParts`; everything here is the same code path for both, so resume, metrics,
progress and preemption behave identically.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ds_train import __version__
from ds_train.checkpoint.compat import fingerprint, model_signature
from ds_train.checkpoint.layout import CheckpointRef, checkpoints_dir, latest_checkpoint
from ds_train.checkpoint.manager import CheckpointManager
from ds_train.checkpoint.nvme_optimizer import elastic_resume_problem, swap_layout
from ds_train.checkpoint.start_point import is_own, lineage, own_step, run_dir_of, write_lineage
from ds_train.config import Config, ConfigError, dump_yaml
from ds_train.data.shard_format import tokenizer_fingerprint
from ds_train.data.stream_origin import (
    StreamOrigin,
    StreamSegment,
    forced_resume_note,
    inherited_history,
    record_segment,
    resume_origin,
)
from ds_train.distributed.deepspeed_config import resolve_precision, with_universal_loading
from ds_train.distributed.engine import (
    DistributedContext,
    broadcast_object,
    build_engine,
    configure_logging,
    init_distributed,
    shutdown,
    shutdown_after_error,
)
from ds_train.distributed.op_builds import offload_op_problem
from ds_train.model.build import attention_problem
from ds_train.model.flops import count_params, device_peak_flops, flops_per_token
from ds_train.train.callbacks.base import Callback
from ds_train.train.callbacks.preemption import PreemptionHandler
from ds_train.train.epochs import steps_line
from ds_train.train.optimizer_groups import optimizer_settings, param_groups, restore_optimizer_settings
from ds_train.train.run_lock import NvmeSwapLock, RunDirLock
from ds_train.train.schedule import schedule_change_note, schedule_settings, train_lr_multiplier
from ds_train.train.settings import TrainerSettings
from ds_train.train.trainer import Trainer

log = logging.getLogger(__name__)


def run_on_this_rank(
    cfg: Config,
    preflight: Callable[[Config], Any],
    body: Callable[[DistributedContext, Any, PreemptionHandler], int],
) -> tuple[int, DistributedContext | None]:
    """The frame of `ds-train pretrain` and `finetune` on one rank: the preemption handler goes in
    before the slow start-up (a signal is then held, not fatal), the checks that need no process
    group run before one exists, and the process group is always torn down: after a clean run the
    ranks meet first; after an error see `shutdown_after_error`. Returns (exit code, context), the context None when
    there was nothing to do (`nothing_to_train`)."""
    preemption = PreemptionHandler().install()
    pre = preflight(cfg)
    done = nothing_to_train(cfg, pre)
    if done:
        configure_logging(pre.launch.rank == 0)
        log.warning(done)
        return 0, None
    check_startup(cfg, pre)
    lock = swap_lock = None
    try:
        if pre.launch.rank == 0:
            lock = RunDirLock(cfg.run.output_dir).acquire()
            if _latest_step(cfg) != own_step(pre.resume_from, cfg.run.output_dir):
                pre = preflight(cfg)  # a run that held the directory saved after this start looked
        if pre.launch.local_rank == 0 and "nvme" in (cfg.zero.offload_optimizer, cfg.zero.offload_param):
            swap_lock = NvmeSwapLock(cfg.zero.nvme_path, run=cfg.run.output_dir).acquire()  # on each node
        ctx = init_distributed(pre.launch, cfg.run.collective_timeout_s)
        configure_logging(ctx.is_main)
        try:
            code = body(ctx, pre, preemption)
        except BaseException as e:
            shutdown_after_error(e)
            raise
        shutdown(wait_for_peers=True)
        return code, ctx
    finally:
        for held in (swap_lock, lock):
            if held is not None:
                held.release()


def _latest_step(cfg: Config) -> int | None:
    ref = latest_checkpoint(checkpoints_dir(Path(cfg.run.output_dir)))
    return ref.step if ref is not None else None


def nothing_to_train(cfg: Config, pre: Any) -> str | None:
    """A note when the start has nothing to do, so it ends at once: the latest checkpoint is beyond
    train.max_steps (lowered since), or at it and written by another number of ranks, where loading
    it would convert it to the universal format (fp32 weights and Adam moments, 12 bytes a
    parameter, kept on disk) only to find nothing to do. A run at max_steps on its own number of
    ranks still loads, to complete what a killed attempt left after its last checkpoint (its
    export; the final evaluation only if the checkpoint does not record it)."""
    ref = pre.resume_from
    if ref is None or ref.step < cfg.train.max_steps:
        return None
    if not is_own(ref, cfg.run.output_dir):
        return (
            f"run.start_from's checkpoint {ref.path} is at step {ref.step}, not before train.max_steps="
            f"{cfg.train.max_steps}; nothing to train. Raise train.max_steps to train on from it."
        )
    if ref.step > cfg.train.max_steps:
        return (
            f"{cfg.run.output_dir}: its checkpoint {ref.tag} is beyond train.max_steps={cfg.train.max_steps}; "
            "nothing to train. Raise train.max_steps to train further, or use another run.output_dir."
        )
    from ds_train.convert.reshard import needs_universal

    state = ref.state()
    if not needs_universal(state, pre.launch.world_size):
        return None
    return (
        f"{cfg.run.output_dir} is finished: its checkpoint {ref.tag} is at train.max_steps="
        f"{cfg.train.max_steps} (written by {state.get('world_size')} ranks); nothing to train on "
        f"{pre.launch.world_size} rank(s). Raise train.max_steps to train further."
    )


def check_startup(cfg: Config, pre: Any) -> None:
    """Raise ConfigError (one line) when this machine cannot start this run: what the config alone
    cannot tell (the attention kernel on this device, DeepSpeed's ops for offload, resuming an
    NVMe-offloaded optimizer on this world size). Asked by every start and by `--check`."""
    problem = attention_problem(cfg.model.attn_implementation) or offload_op_problem(
        cfg.zero.offload_optimizer, cfg.zero.offload_param
    )
    if problem is None and pre.resume_from is not None:
        problem = elastic_resume_problem(
            pre.resume_from.state(), pre.launch.world_size, cfg.zero.offload_optimizer
        )
    if problem:
        raise ConfigError(problem)


@dataclass
class TrainingParts:
    model: torch.nn.Module
    objective: Any
    objective_name: str  # recorded in checkpoints; resuming with another is refused
    seq_len: int
    train_batches: Callable[[StreamOrigin], Iterable[dict]]  # this rank's micro-batches from an origin on
    data_state: Callable[[int], dict]  # consumed samples → the data position saved in checkpoints
    write_extras: Callable[[Path], None]  # files riding along in each checkpoint (rank 0)
    eval_batches: Callable[[], Iterable[dict]] | None = None
    downstream: Callable[[Any, Callable[[dict], dict]], dict] | None = (
        None  # (engine, batch mover) → data.downstream's figures
    )
    describe_sample: Callable[[int, int, int], str] | None = None
    eval_set_names: list[str] | None = None  # one per data.valid set: a validation loss for each
    train_set_names: list[str] | None = None  # one per source of a data.train mixture: a loss each
    extra_state: dict = field(default_factory=dict)  # more keys for ds_train_state.json


def build_trainer(
    cfg: Config,
    ctx: DistributedContext,
    pre: Any,  # train.pretrain.Preflight (launch, layout, tokenizer, hf_config, resume_from)
    parts: TrainingParts,
    ds_config: dict,
    callbacks: list[Callback],
) -> Trainer:
    """Engine + checkpoints (+ resume) + Trainer; returns the Trainer ready to `fit()`."""
    model = parts.model
    n_params, n_embed = count_params(model)
    fpt = flops_per_token(model, parts.seq_len)
    resume_from = pre.resume_from
    branch_point = None  # the other run's checkpoint this run branches off (run.start_from)
    if resume_from is not None and not is_own(resume_from, cfg.run.output_dir):
        resume_from = branch_point = _agree_on_branch_point(cfg, ctx, resume_from)
    ancestry = lineage(resume_from.state(), resume_from, cfg.run.output_dir) if resume_from else []
    checkpoints = CheckpointManager(
        cfg.run.output_dir, ctx, cfg.train.keep_last, keep_host_memory=cfg.train.save_async_keep_memory
    )
    checkpoints.keep_every = cfg.train.keep_every
    if resume_from is not None:
        # every file against the manifest's sha256 before anything reads it; then, on another
        # world size, resume through DeepSpeed's universal format
        checkpoints.verify(resume_from, resume_from.state())
        from ds_train.convert.reshard import elastic_resume

        # a branch's conversion goes under its own checkpoints/: the other run's is only read
        into = checkpoints.root if branch_point is not None else None
        resume_from, universal = elastic_resume(resume_from, ctx.world_size, is_main=ctx.is_main, into=into)
        if universal:
            ds_config = with_universal_loading(ds_config)
    lr_lambda = train_lr_multiplier(cfg.train)
    engine = build_engine(
        model,
        param_groups(model, cfg.train.weight_decay, cfg.train.embedding_weight_decay),
        ds_config,
        lr_lambda,
    )
    start_step, loaded = 0, {}
    if resume_from is not None:
        configured = optimizer_settings(engine)
        loaded = checkpoints.load(engine, resume_from)
        start_step = loaded["step"]
        changed, restored = restore_optimizer_settings(engine, configured, lr_lambda)
        if changed and ctx.is_main:
            log.warning("resuming with this config's optimizer settings, not the checkpoint's: %s", changed)
        note = schedule_change_note(loaded.get("schedule"), cfg.train, start_step)
        if note and ctx.is_main:
            log.warning(note)
        if restored and ctx.is_main:
            log.info("put back what the checkpoint's loading had changed: %s", restored)
        if branch_point is not None:  # its best evaluation, early stopping and all, is the other run's
            loaded = {k: v for k, v in loaded.items() if k not in ("best_metric", "stopped_early")}
            if ctx.is_main:
                log.info("branching off %s at step %d (run.start_from)", branch_point.path, start_step)
    data_fingerprint = parts.data_state(0)["fingerprint"]
    origin = resume_origin(loaded, data_fingerprint)
    note = forced_resume_note(loaded, data_fingerprint, pre.layout.schedule)
    if note and ctx.is_main:
        log.warning(note)
    if ctx.is_main:  # for `ds-train data order|show` on this run
        segment = StreamSegment(origin, data_fingerprint, pre.layout.schedule)
        # a branch carries on the other run's record of its data stream up to the branch point
        inherited = inherited_history(loaded, run_dir_of(branch_point)) if branch_point is not None else None
        stream_history = [s.as_dict() for s in record_segment(cfg.run.output_dir, loaded, segment, inherited)]
    else:
        stream_history = []  # rank 0 writes the checkpoint state
    precision = resolve_precision(cfg.train.precision)
    if ctx.is_main:
        log.info(
            "ds_train %s | %s launch, %d rank(s) | %s params (%s non-embedding) | ZeRO-%d%s %s | "
            "global batch %d = %d micro × %d accum × %d ranks | seq_len %d | %s | %s",
            __version__,
            pre.launch.launcher,
            ctx.world_size,
            f"{n_params:,}",
            f"{n_params - n_embed:,}",
            cfg.zero.stage,
            _offload_note(cfg.zero.offload_optimizer, cfg.zero.offload_param),
            precision,
            pre.layout.global_batch_size,
            pre.layout.micro_batch_size,
            pre.layout.grad_accum,
            ctx.world_size,
            parts.seq_len,
            steps_line(cfg),
            f"resuming at step {start_step}" if start_step else "fresh start",
        )

    model_sig = model_signature(pre.hf_config)
    tok_sha = tokenizer_fingerprint(pre.tokenizer)["sha256"]
    swap_files = swap_layout(engine)  # where a converter finds what NVMe offload swapped out
    trainer: Trainer | None = None

    def state_fn(step: int) -> dict:
        consumed = origin.position(step, pre.layout.schedule)  # the stream position
        return {
            "consumed_samples": consumed,
            "data": parts.data_state(consumed),
            "model_config": model_sig,
            "model_fingerprint": fingerprint(model_sig),
            "tokenizer_sha256": tok_sha,
            "objective": parts.objective_name,
            "zero_stage": cfg.zero.stage,
            "decay_embeddings": cfg.train.embedding_weight_decay,  # the parameter groups' layout
            "precision": precision,
            **pre.layout.schedule.as_state(),  # global_batch_size, batch_ramp
            "seed": cfg.run.seed,
            "ds_train_version": __version__,
            "metrics": trainer.final_record,
            "trained_samples": trainer.samples_trained(step),
            "schedule": schedule_settings(cfg.train),
            "best_metric": trainer.best.state(),
            "evaluated_step": trainer.evaluated_step,
            "last_evaluation": trainer.last_eval,
            "stopped_early": trainer.stopped_early,
            "spike_guard": trainer.spikes.state(),  # so a resumed run skips what this one would
            "lineage": ancestry,  # the runs this one branched off (run.start_from), oldest first
            "data_stream": stream_history,  # the changes of data or batches so far (stream_origin.py)
            **parts.extra_state,
            **swap_files,
        }

    settings = TrainerSettings(
        max_steps=cfg.train.max_steps,
        log_every=cfg.train.log_every,
        save_every=cfg.train.save_every,
        eval_every=cfg.train.eval_every,
        eval_steps=cfg.train.eval_steps,
        seq_len=parts.seq_len,
        flops_per_token=fpt,
        peak_flops=cfg.train.peak_flops or device_peak_flops(precision),
        nonfinite=cfg.train.nonfinite,
        max_nonfinite=cfg.train.max_nonfinite,
        skip_spike_sigma=cfg.train.skip_spike_sigma,
        skip_spike_window=cfg.train.skip_spike_window,
        per_layer_norms_every=cfg.train.per_layer_norms_every,
        collective_timeout_s=cfg.run.collective_timeout_s,
        straggler_ratio=cfg.train.straggler_ratio,
        save_async=cfg.train.save_async,
        save_final=cfg.train.save_final,
        best_metric=cfg.train.best_metric,
        keep_best=cfg.train.keep_best,
        early_stopping_patience=cfg.train.early_stopping_patience,
        seed=cfg.run.seed,
    )
    trainer = Trainer(
        settings=settings,
        ctx=ctx,
        engine=engine,
        objective=parts.objective,
        layout=pre.layout,
        train_batches=parts.train_batches(origin),
        checkpoints=checkpoints,
        state_fn=state_fn,
        config_yaml=dump_yaml(cfg),
        start_step=start_step,
        write_extras=parts.write_extras,
        eval_batches=parts.eval_batches,
        downstream=parts.downstream,
        describe_sample=parts.describe_sample,
        eval_set_names=parts.eval_set_names,
        train_set_names=parts.train_set_names,
        callbacks=callbacks,
        resumed=loaded,
    )
    if branch_point is not None:  # the branch point is the other run's checkpoint, not yet one of its own
        trainer.last_saved_step = -1
    return trainer


def _agree_on_branch_point(cfg: Config, ctx: DistributedContext, ref: CheckpointRef) -> CheckpointRef:
    """Every rank branches off rank 0's choice, pinned in lineage.json before anything is loaded:
    each rank resolved run.start_from on its own, and a run directory's latest moves when that run
    saves between them; a requeue before the branch's first save finds the same one there."""
    if ctx.is_main:
        write_lineage(cfg.run.output_dir, cfg.run.start_from, lineage(ref.state(), ref, cfg.run.output_dir))
    path = Path(broadcast_object(str(ref.path)))
    return CheckpointRef(path.parent, path.name)


def _offload_note(optimizer: str, param: str) -> str:
    """' (optimizer on nvme, parameters on cpu)' for the start-up line; '' without offload."""
    parts = [
        f"{what} on {where}"
        for what, where in (("optimizer", optimizer), ("parameters", param))
        if where != "none"
    ]
    return f" ({', '.join(parts)})" if parts else ""
