"""`ds-train finetune` on every rank: preflight, data, base model, (LoRA), the shared training
session, then the final export with its model card.

The training loop, checkpoints, resume, metrics and progress are pretraining's
(`train.session.build_trainer`); what fine-tuning adds is the task's data (tokenized once into the
run directory), the task model (with its new head initialised stage-independently), optional LoRA
adapters, and evaluation metrics.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

from ds_train.checkpoint.layout import HF_CONFIG_DIR, TOKENIZER_DIR
from ds_train.config import Config, dump_yaml
from ds_train.data.loader import build_plan, eval_steps_once, make_loader, order_settings
from ds_train.data.shard_set import source_names
from ds_train.data.stream_origin import StreamOrigin
from ds_train.distributed.deepspeed_config import (
    build_deepspeed_config,
    largest_param_to_swap,
    resolve_precision,
)
from ds_train.distributed.engine import (
    DistributedContext,
    HfZeroContext,
    broadcast_object,
)
from ds_train.finetune.base_model import materialize_base
from ds_train.finetune.batches import ExampleBatches
from ds_train.finetune.classification import SequenceClassification, class_weights
from ds_train.finetune.dataset import ExampleSet, prepare_splits
from ds_train.finetune.export import ADAPTER_DIR, HF_DIR, gather_full_state, save_merged_model
from ds_train.finetune.lora import apply_lora, trainable_summary
from ds_train.finetune.model import build_task_model
from ds_train.finetune.model_card import render_model_card, write_model_card
from ds_train.finetune.preflight import FinetunePreflight, preflight
from ds_train.finetune.report import EvalReport
from ds_train.finetune.sft import SupervisedFineTuning
from ds_train.finetune.shard_examples import SftShardBatches
from ds_train.model.build import verify_loaded_weights
from ds_train.objectives.masked_lm import MaskedLM
from ds_train.train.callbacks.base import Callback
from ds_train.train.callbacks.preemption import PreemptionHandler
from ds_train.train.pretrain import seed_everything, standard_callbacks
from ds_train.train.session import TrainingParts, build_trainer, run_on_this_rank
from ds_train.train.source_losses import for_mixture

log = logging.getLogger(__name__)


def run(cfg: Config, *, extra_callbacks: tuple[Callback, ...] = ()) -> int:
    """Fine-tune on this rank. Returns the exit code (0 done, 75 preempted and checkpointed)."""
    code, _ = run_on_this_rank(
        cfg, preflight, lambda ctx, pre, preemption: _run(cfg, ctx, pre, extra_callbacks, preemption)
    )
    return code


def build_objective(cfg: Config, pre: FinetunePreflight, train_counts: dict[str, int] | None = None):
    """`train_counts`: examples per class in the train split (finetune.class_weights=balanced)."""
    task = cfg.finetune.task
    chunk = cfg.model.loss_chunk_tokens
    if task == "sft":
        return SupervisedFineTuning(loss_chunk_tokens=chunk, z_loss=cfg.model.z_loss)
    if task == "classification":
        weights = class_weights(cfg.finetune.class_weights, pre.class_names, train_counts or {})
        return SequenceClassification(pre.class_names, class_weights=weights)
    # continued pretraining: pretraining's masked-LM objective, unchanged
    return MaskedLM.from_tokenizer(
        pre.tokenizer,
        seed=cfg.data_seed,
        probability=cfg.data.mlm_probability,
        loss_chunk_tokens=chunk,
        z_loss=cfg.model.z_loss,
    )


def collate_fn(objective):
    """Arrays of a split's rows → batch. Pretraining's objectives take the token rows alone."""
    if isinstance(objective, MaskedLM):
        return functools.partial(_collate_token_rows, objective)
    return objective.collate


def _collate_token_rows(objective, arrays: dict, sample_ids):
    return objective.collate(arrays["tokens"], sample_ids)


def _run(
    cfg: Config,
    ctx: DistributedContext,
    pre: FinetunePreflight,
    extra_callbacks,
    preemption: PreemptionHandler,
) -> int:
    seed_everything(cfg.run.seed, ctx.rank)
    f = cfg.finetune
    run_dir = Path(cfg.run.output_dir)
    ds_config = build_deepspeed_config(cfg, ctx.world_size, largest_param_to_swap(cfg, pre.hf_config))
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(dump_yaml(cfg))
    splits = {}
    if pre.shard_sets is None:  # JSON lines: tokenized once into the run directory
        splits = prepare_splits(
            run_dir,
            f,
            pre.specs,
            pre.tokenizer,
            chat=pre.chat,
            class_names=pre.class_names,
            fingerprint=pre.data_fingerprint,
            is_main=ctx.is_main,
        )
    weights_dir = materialize_base(pre.source, run_dir, is_main=ctx.is_main)
    train_counts = splits["train"].meta["stats"].get("class_counts") if "train" in splits else None
    objective = build_objective(cfg, pre, train_counts)
    if ctx.is_main and getattr(objective, "class_weights", None) is not None:
        shown = ", ".join(f"{n} {w:.3g}" for n, w in zip(pre.class_names, objective.class_weights))
        log.info(
            "finetune: class weights (finetune.class_weights=%s): %s",
            f.class_weights if isinstance(f.class_weights, str) else "given",
            shown,
        )
    callbacks = [
        *standard_callbacks(cfg, ctx, preemption),
        *([EvalReport()] if ctx.is_main else []),
        *extra_callbacks,
    ]

    zero_ctx = HfZeroContext(ds_config)
    state = None
    try:
        model = build_task_model(
            f.task, cfg.model, pre.hf_config, weights_dir=weights_dir, seed=cfg.run.seed, rank=ctx.rank
        )
        # the task class, in checkpoints' hf_config/ and the export (the base may say e.g. BertModel)
        pre.hf_config.architectures = model.config.architectures = [type(model).__name__]
        if weights_dir is not None:
            verify_loaded_weights(model, weights_dir)  # never train on silently re-initialised weights
        if f.adapter == "lora":
            model = apply_lora(model, f, cfg.run.seed)
        if ctx.is_main:
            trainable, total = trainable_summary(model)
            log.info(
                "finetune: task %s | %s | base %s | %s of %s parameters trainable",
                f.task,
                "LoRA" if f.adapter == "lora" else "full fine-tuning",
                "fresh from model.config" if pre.source is None else pre.source.describe(),
                f"{trainable:,}",
                f"{total:,}",
            )
        parts = (
            _shard_parts(cfg, ctx, pre, model, objective)
            if pre.shard_sets is not None
            else _parts(cfg, ctx, pre, model, objective, splits)
        )
        trainer = build_trainer(cfg, ctx, pre, parts, ds_config, callbacks)
        code = trainer.fit()
        if code == 0 and f.export_hf:
            state = gather_full_state(trainer.engine.module, keep=ctx.is_main)
            if f.adapter == "lora":
                _save_adapters(trainer.engine.module, run_dir / ADAPTER_DIR)
    finally:
        zero_ctx.close()  # the export builds a plain CPU model, which must not be partitioned

    if code == 0 and f.export_hf:
        result = ("ok", "")
        if state is not None:  # rank 0
            try:
                _export(cfg, pre, state, splits, trainer)
            except Exception as e:  # every rank must hear of it instead of waiting for a timeout
                log.exception("export failed")
                result = ("error", f"export to {run_dir / HF_DIR} failed: {e}")
        status, message = broadcast_object(result)
        if status == "error":
            raise RuntimeError(message)
    if ctx.is_main:
        log.info("run directory: %s (metrics.jsonl, checkpoints/, dataset/, hf/)", run_dir)
    return code


def _parts(cfg, ctx, pre, model, objective, splits: dict[str, ExampleSet]) -> TrainingParts:
    train_set = splits["train"]
    layout, seed, collate = pre.layout, cfg.data_seed, collate_fn(objective)

    def train_batches(origin: StreamOrigin):
        dataset = ExampleBatches(
            train_set,
            layout,
            ctx.rank,
            collate,
            seed=seed,
            start_step=origin.step,
            shuffle=cfg.data.shuffle,
            origin=origin,
        )
        return make_loader(
            dataset, num_workers=cfg.data.num_workers, prefetch_factor=cfg.data.prefetch_factor
        )

    eval_batches = None
    if "valid" in splits:
        valid_ds = ExampleBatches(splits["valid"], layout, ctx.rank, collate, seed=seed, evaluation=True)

        def eval_batches():
            return make_loader(
                valid_ds,
                num_workers=min(1, cfg.data.num_workers),
                prefetch_factor=cfg.data.prefetch_factor,
                num_micro_batches=valid_ds.eval_micro_batches(),
            )

    def data_state(consumed: int) -> dict:
        return {
            "consumed_samples": int(consumed),
            "seed": seed,
            "order": order_settings(cfg.data.shuffle, 1),
            "fingerprint": pre.data_fingerprint,
            "seq_len": cfg.finetune.seq_len,
            "epoch": consumed / train_set.num_rows,
        }

    return TrainingParts(
        model=model,
        objective=objective,
        objective_name=cfg.finetune.task,
        seq_len=cfg.finetune.seq_len,
        train_batches=train_batches,
        data_state=data_state,
        write_extras=functools.partial(_write_extras, pre),
        eval_batches=eval_batches,
        describe_sample=lambda source, shard, row: train_set.describe(row),
        extra_state={"finetune": pre.finetune_state(cfg)},
    )


def _write_extras(pre, directory: Path) -> None:
    """The task model's HF config and the tokenizer ride along, as in pretraining checkpoints."""
    pre.hf_config.save_pretrained(str(directory / HF_CONFIG_DIR))
    pre.tokenizer.save_pretrained(str(directory / TOKENIZER_DIR))


def _shard_parts(cfg, ctx, pre, model, objective) -> TrainingParts:
    """SFT from `ds-train shard --sft` sets: pretraining's streaming loader (order, rank slices,
    exact and elastic resume, eval over data.valid) with the masks read beside the tokens."""
    sets, layout, d = pre.shard_sets, pre.layout, cfg.data
    plan = build_plan(
        d.train, seed=cfg.data_seed, shuffle=d.shuffle, window=d.shuffle_window, shard_sets=sets["train"]
    )
    cache_dir = d.cache_dir or str(Path(cfg.run.output_dir) / "shard_cache")
    # a mixture: each source's training loss too (`loss/<name>`)
    objective, train_set_names = for_mixture(objective, d.train, len(plan.sources))

    def train_batches(origin: StreamOrigin):
        dataset = SftShardBatches(
            plan,
            layout,
            ctx.rank,
            origin.step,
            objective,
            cache_dir,
            skip_corrupt=d.skip_corrupt,
            origin=origin,
        )
        return make_loader(dataset, num_workers=d.num_workers, prefetch_factor=d.prefetch_factor)

    eval_batches = None
    if "valid" in sets:
        valid_plan = build_plan(
            d.valid,
            seed=cfg.data_seed,
            shuffle=False,
            window=d.shuffle_window,
            shard_sets=sets["valid"],
            evaluation=True,
        )
        valid_ds = SftShardBatches(
            valid_plan,
            layout,
            ctx.rank,
            0,
            objective,
            cache_dir,
            skip_corrupt=d.skip_corrupt,
            limit=valid_plan.epoch_size,
        )
        eval_steps = eval_steps_once(valid_plan, layout, cfg.train.eval_steps, is_main=ctx.is_main)

        def eval_batches():
            return make_loader(
                valid_ds,
                num_workers=min(1, d.num_workers),
                prefetch_factor=d.prefetch_factor,
                num_micro_batches=eval_steps * layout.grad_accum,
            )

    return TrainingParts(
        model=model,
        objective=objective,
        objective_name=cfg.finetune.task,
        seq_len=cfg.finetune.seq_len,
        train_batches=train_batches,
        data_state=plan.state,
        write_extras=functools.partial(_write_extras, pre),
        eval_batches=eval_batches,
        describe_sample=plan.describe,
        eval_set_names=source_names(d.valid) if "valid" in sets else None,
        train_set_names=train_set_names,
        extra_state={"finetune": pre.finetune_state(cfg)},
    )


def shard_data_summary(pre: FinetunePreflight) -> dict[str, dict]:
    """What the model card lists per split for shard data (the JSON-lines path lists dataset meta)."""
    out = {}
    for split, sets in (pre.shard_sets or {}).items():
        stats: dict = {}
        for s in sets:
            for k, v in (s.sft.get("stats") or {}).items():
                if isinstance(v, int):
                    stats[k] = stats.get(k, 0) + v
        out[split] = {
            "files": [s.location for s in sets],
            "rows": sum(s.num_rows for s in sets),
            "stats": stats,
            "chat_template": sets[0].sft.get("chat_template"),
        }
    return out


def _save_adapters(model, out_dir: Path) -> None:
    """LoRA adapters in peft format, gathered from ZeRO-3 partitions (collective: every rank calls it)."""
    from ds_train.convert.lora import save_lora_adapters

    save_lora_adapters(model, out_dir)


def _export(cfg: Config, pre: FinetunePreflight, state, splits, trainer) -> None:
    """Rank 0: the merged HF directory, the training chat template, and the model card."""
    f = cfg.finetune
    out = Path(cfg.run.output_dir) / HF_DIR
    if pre.chat is not None:
        pre.tokenizer.chat_template = pre.chat.export_template()
    model = save_merged_model(state, f, pre.hf_config, pre.tokenizer, out)
    if f.adapter == "lora":  # the adapters travel with the tokenizer they were trained with (its
        pre.tokenizer.save_pretrained(str(Path(cfg.run.output_dir) / ADAPTER_DIR))  # chat template)
    card = render_model_card(
        name=f"{cfg.run.name or Path(cfg.run.output_dir).name}",
        task=f.task,
        architecture=type(model).__name__,
        num_params=sum(p.numel() for p in model.parameters()),
        base_model="a fresh model from " + str(cfg.model.config)
        if pre.source is None
        else pre.source.describe(),
        adapter=pre.finetune_state(cfg)["adapter"],
        data={split: s.meta for split, s in splits.items()} or shard_data_summary(pre),
        train={
            "steps": trainer.step,
            "global_batch_size": pre.layout.global_batch_size,
            "world_size": pre.launch.world_size,
            "lr": cfg.train.lr,
            "schedule": cfg.train.schedule,
            "precision": resolve_precision(cfg.train.precision),
            "zero_stage": cfg.zero.stage,
        },
        config_yaml=dump_yaml(cfg),
        final_train=trainer.final_record,
        final_eval=trainer.last_eval,
        text_pair=bool(f.text_pair_field),
    )
    write_model_card(out, card)
