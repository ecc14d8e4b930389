"""`ds-train pretrain`: preflight checks, then model + data + engine + trainer on every rank.

Everything that can be wrong with the user's input is checked in `preflight`, before a process
group exists or a file is written; `run` is the only function that touches the run directory.
"""

from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ds_train.checkpoint.compat import check_data_resume, check_resume, model_signature
from ds_train.checkpoint.integrity import CheckpointDamaged, damaged_message, manifest_problems
from ds_train.checkpoint.layout import (
    HF_CONFIG_DIR,
    TOKENIZER_DIR,
    CheckpointRef,
)
from ds_train.checkpoint.start_point import described, is_own, start_point
from ds_train.config import Config, ConfigError, dump_yaml, to_dict, validate
from ds_train.data.document_framing import missing_bos_note
from ds_train.data.loader import (
    DataPlan,
    MicroBatches,
    build_plan,
    eval_steps_once,
    load_shard_sets,
    make_loader,
)
from ds_train.data.shard_format import tokenizer_fingerprint
from ds_train.data.shard_set import DataError, source_names
from ds_train.data.stream_origin import StreamOrigin
from ds_train.distributed.deepspeed_config import (
    BatchLayout,
    batch_layout,
    build_deepspeed_config,
    largest_param_to_swap,
)
from ds_train.distributed.engine import (
    DistributedContext,
    HfZeroContext,
    broadcast_object,
)
from ds_train.distributed.launch_env import LaunchEnv, detect, launch_for_check
from ds_train.model.blocks import check_checkpointing_layers
from ds_train.model.build import (
    build_model,
    check_positions,
    check_residual_init,
    load_hf_config,
    load_tokenizer,
    make_causal,
    verify_loaded_weights,
)
from ds_train.objectives import build_objective
from ds_train.objectives.masked_lm import require_mask_token
from ds_train.train.best_metric import check_best_settings
from ds_train.train.callbacks.base import Callback
from ds_train.train.callbacks.fault_injection import FaultInjection
from ds_train.train.callbacks.garbage_collection import SyncedGarbageCollection
from ds_train.train.callbacks.metrics_file import MetricsFile
from ds_train.train.callbacks.preemption import PreemptionHandler
from ds_train.train.callbacks.progress import Progress
from ds_train.train.callbacks.step_profiler import StepProfiler, wants_profiler, window_notes
from ds_train.train.callbacks.trackers import TensorBoard, wandb_callback
from ds_train.train.downstream import downstream_scorer, load_tasks
from ds_train.train.epochs import resolve_epochs
from ds_train.train.hf_export import PeriodicHfExport, export_final
from ds_train.train.output_dir import check_output_dir
from ds_train.train.session import TrainingParts, build_trainer, check_startup, run_on_this_rank
from ds_train.train.source_losses import for_mixture

log = logging.getLogger(__name__)


@dataclass
class Preflight:
    launch: LaunchEnv
    layout: BatchLayout
    tokenizer: Any
    hf_config: Any
    resume_from: CheckpointRef | None


def preflight(cfg: Config, launch: LaunchEnv | None = None, *, needs_train_data: bool = True) -> Preflight:
    """All checks that need no process group; raises ConfigError with one line."""
    launch = launch or detect()
    validate(cfg, needs_train_data=needs_train_data)
    layout = batch_layout(cfg.train, launch.world_size)
    tokenizer = load_tokenizer(cfg.model)
    hf_config = load_hf_config(cfg.model, tokenizer)
    if cfg.model.objective == "causal_lm":
        make_causal(hf_config)
    check_checkpointing_layers(cfg.model.activation_checkpointing_layers, hf_config)
    check_residual_init(cfg.model, hf_config)
    if cfg.model.objective == "masked_lm":
        require_mask_token(tokenizer, "model.objective=masked_lm")
    run_dir = Path(cfg.run.output_dir)
    check_output_dir(run_dir)
    if needs_train_data:
        _check_local_sources(cfg.data.train, "data.train")
        if cfg.train.epochs is not None:  # one pass: the training sets' rows together
            from ds_train.data.loader import load_shard_sets

            try:
                rows = sum(s.num_rows for s in load_shard_sets(cfg.data.train))
            except DataError as e:
                raise ConfigError(f"data.train: {e}") from None
            resolve_epochs(cfg, rows, "data.train")
    if cfg.data.valid:
        _check_local_sources(cfg.data.valid, "data.valid")
    check_best_settings(cfg, has_validation=bool(cfg.data.valid or cfg.data.downstream))
    _warn_on_launcher_zero_settings(cfg)
    ref = start_point(cfg.run)
    if ref is not None:
        state = ref.state()
        named = described(ref, run_dir)
        check_resume(
            state,
            where=named.where,
            remedy=named.remedy,
            model_sig=model_signature(hf_config),
            tokenizer_sha=tokenizer_fingerprint(tokenizer)["sha256"],
            objective=cfg.model.objective,
            global_batch_size=cfg.train.global_batch_size,
            batch_ramp=cfg.train.batch_ramp,
            force=cfg.run.force_resume,
            zero_stage=cfg.zero.stage,
            decay_embeddings=cfg.train.embedding_weight_decay,
        )
        problems = manifest_problems(ref.path, state, checksums=False)  # sizes now, sha256 at load
        if problems:
            raise CheckpointDamaged(damaged_message(ref, problems, own=is_own(ref, run_dir)))
    return Preflight(launch, layout, tokenizer, hf_config, ref)


def run(cfg: Config, *, extra_callbacks: tuple[Callback, ...] = ()) -> int:
    """Train on this rank. Returns the exit code (0 done, 75 preempted and checkpointed)."""
    code, ctx = run_on_this_rank(
        cfg, preflight, lambda ctx, pre, preemption: _run(cfg, ctx, pre, extra_callbacks, preemption)
    )
    if code == 0 and cfg.train.export_hf and ctx is not None and ctx.is_main:
        export_final(cfg.run.output_dir)  # after the process group is gone: no rank waits on it
    return code


def check(cfg: Config, *, world_size: int | None = None) -> Preflight:
    """What `ds-train pretrain --check` runs: every check a start makes before it trains (config,
    paths, batch arithmetic, the checkpoint, this machine, the shards and their resume), in this
    process, with no process group; `world_size`: as a launch of that many ranks would see it."""
    pre = preflight(cfg, launch_for_check(world_size))
    check_startup(cfg, pre)
    plan, _ = data_plans(cfg, pre)
    load_tasks(
        cfg.data.downstream, pre.tokenizer, plan.seq_len, plan.sources[0].bos_token_id,
        cfg.data.downstream_max_examples,
    )  # fmt: skip
    return pre


def data_plans(cfg: Config, pre: Preflight) -> tuple[DataPlan, DataPlan | None]:
    """The train and valid data plans (manifests read by rank 0), checked against the model's
    tokenizer and, on resume, against the checkpoint's data stream."""
    tok_sha = tokenizer_fingerprint(pre.tokenizer)["sha256"]
    plan = _plan_on_rank0(cfg.data.train, cfg, shuffle=cfg.data.shuffle)
    valid_plan = (
        _plan_on_rank0(cfg.data.valid, cfg, shuffle=False, evaluation=True) if cfg.data.valid else None
    )
    for key, p in (("data.train", plan), ("data.valid", valid_plan)):
        if p is None:
            continue
        if p.tokenizer_sha256 != tok_sha:
            raise DataError(
                f"{key} was tokenized with another tokenizer ({p.sources[0].tokenizer.get('name_or_path')}) "
                f"than model.tokenizer ({cfg.model.tokenizer or cfg.model.init_from})"
            )
        # valid's rows may be longer than train's: the first evaluation would index past the table
        check_positions(pre.hf_config, p.seq_len, f"a row of {key} ({p.sources[0].location})")
        note = missing_bos_note(p.sources, pre.tokenizer, key) if key == "data.train" else None
        if note:
            log.warning(note)
    if pre.resume_from is not None:
        check_data_resume(
            pre.resume_from.state(),
            where=str(pre.resume_from.path),
            instead=described(pre.resume_from, cfg.run.output_dir).instead,
            fingerprint_now=plan.fingerprint,
            seq_len=plan.seq_len,
            seed=cfg.data_seed,
            order=plan.order_settings,
            force=cfg.run.force_resume,
        )
    return plan, valid_plan


def _run(
    cfg: Config, ctx: DistributedContext, pre: Preflight, extra_callbacks, preemption: PreemptionHandler
) -> int:
    seed_everything(cfg.run.seed, ctx.rank)
    run_dir = Path(cfg.run.output_dir)
    ds_config = build_deepspeed_config(cfg, ctx.world_size, largest_param_to_swap(cfg, pre.hf_config))
    plan, valid_plan = data_plans(cfg, pre)

    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(dump_yaml(cfg))

    objective = build_objective(
        cfg.model.objective,
        tokenizer=pre.tokenizer,
        seed=cfg.data_seed,  # masked LM's masks: data
        document_masking=cfg.model.document_masking,
        mlm_probability=cfg.data.mlm_probability,
        loss_chunk_tokens=cfg.model.loss_chunk_tokens,
        z_loss=cfg.model.z_loss,
    )
    # a mixture: each source's training loss too (`loss/<name>` in metrics.jsonl)
    objective, train_set_names = for_mixture(objective, cfg.data.train, len(plan.sources))
    zero_ctx = HfZeroContext(ds_config)
    try:
        model = build_model(
            cfg.model,
            pre.hf_config,
            seed=cfg.run.seed,
            rank=ctx.rank,
            fresh_weights=pre.resume_from is None,  # a resumed run loads every weight
        )
        if cfg.model.init_from:
            verify_loaded_weights(model, cfg.model.init_from)

        def train_batches(origin: StreamOrigin):
            dataset = MicroBatches(
                plan,
                pre.layout,
                ctx.rank,
                origin.step,
                objective,
                _cache_dir(cfg),
                skip_corrupt=cfg.data.skip_corrupt,
                origin=origin,
            )
            return make_loader(
                dataset, num_workers=cfg.data.num_workers, prefetch_factor=cfg.data.prefetch_factor
            )

        eval_batches = None
        if valid_plan is not None:
            valid_ds = MicroBatches(
                valid_plan,
                pre.layout.steady,  # evaluation batches are the full global batch, ramp or not
                ctx.rank,
                0,
                objective,
                _cache_dir(cfg),
                skip_corrupt=cfg.data.skip_corrupt,
                limit=valid_plan.epoch_size,
            )
            eval_steps = eval_steps_once(valid_plan, pre.layout, cfg.train.eval_steps, is_main=ctx.is_main)

            def eval_batches():
                return make_loader(
                    valid_ds,
                    num_workers=min(1, cfg.data.num_workers),
                    prefetch_factor=cfg.data.prefetch_factor,
                    num_micro_batches=eval_steps * pre.layout.grad_accum,
                )

        def write_extras(directory: Path) -> None:
            """The HF config and tokenizer ride along, so a checkpoint converts on its own."""
            pre.hf_config.save_pretrained(str(directory / HF_CONFIG_DIR))
            pre.tokenizer.save_pretrained(str(directory / TOKENIZER_DIR))

        parts = TrainingParts(
            model=model,
            objective=objective,
            objective_name=cfg.model.objective,
            seq_len=plan.seq_len,
            train_batches=train_batches,
            data_state=plan.state,
            write_extras=write_extras,
            eval_batches=eval_batches,
            downstream=downstream_scorer(
                cfg.data,
                pre.tokenizer,
                objective,
                plan.seq_len,
                plan.sources[0].bos_token_id,
                pre.layout.micro_batch_size,
                ctx,
            ),
            describe_sample=plan.describe,
            eval_set_names=source_names(cfg.data.valid) if cfg.data.valid else None,
            train_set_names=train_set_names,
        )
        trainer = build_trainer(
            cfg, ctx, pre, parts, ds_config, [*standard_callbacks(cfg, ctx, preemption), *extra_callbacks]
        )
        code = trainer.fit()
        if ctx.is_main:
            log.info("run directory: %s (metrics.jsonl, checkpoints/, tensorboard/)", run_dir)
        return code
    finally:
        zero_ctx.close()


def _check_local_sources(spec, key: str) -> None:
    """A missing local shard directory is a config error worth reporting before start-up (a stat per
    source, not a listing; remote sources are checked once by rank 0 after start-up)."""
    from ds_train.data.shard_format import MANIFEST
    from ds_train.data.shard_set import parse_sources

    try:
        sources = parse_sources(spec)
        source_names(spec)  # explicit names must differ
    except DataError as e:
        raise ConfigError(f"{key}: {e}") from None
    for path, _ in sources:
        if "://" in path or path.startswith("pipe:") or "{" in path:
            continue
        p = Path(path)
        manifest = p if p.name == MANIFEST else (p.parent / MANIFEST if p.suffix == ".tar" else p / MANIFEST)
        if not manifest.is_file():
            raise ConfigError(f"{key}: no shard manifest at {manifest} (create shards with `ds-train shard`)")


def _warn_on_launcher_zero_settings(cfg: Config) -> None:
    """accelerate configs may carry their own ZeRO stage; the run config is what ds_train uses."""
    stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    if (
        stage not in (None, "")
        and stage.isdigit()
        and int(stage) != cfg.zero.stage
        and os.environ.get("RANK", "0") == "0"
    ):
        log.warning(
            "the accelerate config asks for ZeRO stage %s; ds_train uses zero.stage=%d from the run config",
            stage,
            cfg.zero.stage,
        )


def standard_callbacks(
    cfg: Config, ctx: DistributedContext, preemption: PreemptionHandler | None = None
) -> list[Callback]:
    callbacks: list[Callback] = [preemption or PreemptionHandler()]
    fault = FaultInjection.from_env()
    if fault is not None:
        callbacks.append(fault)
    if cfg.train.gc_every:
        callbacks.append(SyncedGarbageCollection(cfg.train.gc_every))
    if wants_profiler(cfg.profile, ctx.rank):
        callbacks.append(StepProfiler(cfg.profile, cfg.run.output_dir, ctx.rank))
    if ctx.is_main:
        for note in window_notes(cfg, ctx.world_size):
            log.warning(note)
        callbacks += [MetricsFile(cfg.run.output_dir), Progress(cfg.train.max_steps)]
        if cfg.train.export_hf_every:
            callbacks.append(
                PeriodicHfExport(
                    cfg.run.output_dir,
                    cfg.train.export_hf_every,
                    save_every=cfg.train.save_every,
                    max_steps=cfg.train.max_steps,
                )
            )
        if cfg.run.tensorboard:
            callbacks.append(TensorBoard(cfg.run.output_dir))
        if cfg.run.wandb:
            cb = wandb_callback(
                cfg.run.name or Path(cfg.run.output_dir).name,
                cfg.run.wandb_project,
                to_dict(cfg),
                cfg.run.output_dir,
            )
            if cb is not None:
                callbacks.append(cb)
    return callbacks


def seed_everything(seed: int, rank: int) -> None:
    """Seeds for what ds_train does not seed explicitly (dropout); distinct per rank."""
    random.seed(seed + rank)
    np.random.seed((seed + rank) % 2**32)
    torch.manual_seed(seed + rank)


def _plan_on_rank0(spec, cfg: Config, *, shuffle: bool, evaluation: bool = False) -> DataPlan:
    """Rank 0 reads the manifests (one listing per job) and broadcasts them, errors included."""
    result: Any = None
    if not _is_initialized() or torch.distributed.get_rank() == 0:
        try:
            result = ("ok", load_shard_sets(spec))
        except (DataError, ConfigError) as e:
            result = ("error", str(e))
    result = broadcast_object(result)
    if result[0] == "error":
        raise DataError(result[1])
    return build_plan(
        spec,
        seed=cfg.data_seed,
        shuffle=shuffle,
        window=cfg.data.shuffle_window,
        shard_sets=result[1],
        evaluation=evaluation,
    )


def _is_initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _cache_dir(cfg: Config) -> str:
    return cfg.data.cache_dir or str(Path(cfg.run.output_dir) / "shard_cache")
