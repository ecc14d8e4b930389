"""Everything `ds-train finetune` checks before a process group starts or a file is written.

The config (including the `finetune` section), the base model source, the tokenizer, every
example of every split (fields, labels: one line naming file:line), the batch arithmetic, and
whether the run directory's checkpoint may be resumed with this config and data.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ds_train.checkpoint.compat import check_data_resume, check_resume, model_signature
from ds_train.checkpoint.layout import CheckpointRef
from ds_train.checkpoint.start_point import described, start_point
from ds_train.config import Config, ConfigError, validate
from ds_train.config.validate_finetune import validate_finetune
from ds_train.data.document_framing import document_start
from ds_train.data.loader import build_plan, load_shard_sets, order_settings
from ds_train.data.shard_format import tokenizer_fingerprint
from ds_train.data.shard_set import DataError, ShardSet
from ds_train.distributed.deepspeed_config import BatchLayout, batch_layout
from ds_train.distributed.launch_env import LaunchEnv, detect, launch_for_check
from ds_train.finetune.base_model import InitSource, resolve_init_source
from ds_train.finetune.chat import ChatFormat
from ds_train.finetune.dataset import data_fingerprint, split_stats
from ds_train.finetune.lora import check_lora_targets
from ds_train.finetune.model import TASK_MODELS, task_hf_config
from ds_train.finetune.records import SplitSpec, check_examples, file_list, split_specs
from ds_train.model.blocks import check_checkpointing_layers
from ds_train.model.build import check_positions, check_residual_init, load_tokenizer
from ds_train.objectives.masked_lm import require_mask_token
from ds_train.train.best_metric import check_best_settings
from ds_train.train.epochs import resolve_epochs
from ds_train.train.output_dir import check_output_dir
from ds_train.train.session import check_startup

# What a checkpoint must agree on besides the model, tokenizer and data (see check_resume).
RESUME_KEYS = ("task", "class_names", "adapter")


@dataclass
class FinetunePreflight:
    launch: LaunchEnv
    layout: BatchLayout
    tokenizer: Any
    hf_config: Any
    resume_from: CheckpointRef | None
    source: InitSource | None  # None: a fresh model from model.config
    specs: dict[str, SplitSpec]
    chat: ChatFormat | None
    class_names: list[str]
    data_fingerprint: str
    # SFT from shards (data.train/data.valid): {"train": [...], "valid": [...]} manifests; specs is then empty
    shard_sets: dict[str, list[ShardSet]] | None = None
    split_stats: dict[str, dict] | None = None  # per JSON-lines split, filled by `check` (tokenized)

    def finetune_state(self, cfg: Config) -> dict:
        """What this run records in checkpoints, and what resuming must match."""
        f = cfg.finetune
        adapter = None
        if f.adapter == "lora":
            adapter = {
                "type": "lora",
                "r": f.lora_r,
                "alpha": f.lora_alpha,
                "dropout": f.lora_dropout,
                "target_modules": f.lora_target_modules,
            }
        return {
            "task": f.task,
            "class_names": self.class_names,
            "adapter": adapter,
            "base_model": None if self.source is None else self.source.describe(),
        }


def preflight(cfg: Config, launch: LaunchEnv | None = None) -> FinetunePreflight:
    """All checks that need no process group; raises ConfigError/DataError with one line.

    Normalises `cfg` in place: data file paths become absolute, so the config saved in the run
    directory means the same from any working directory. (`model.objective` is not used:
    `finetune.task` decides the model class and the loss.)"""
    launch = launch or detect()
    f = cfg.finetune
    f.train_file = _absolute(f.train_file)
    f.valid_file = _absolute(f.valid_file)
    source = None
    if cfg.model.init_from is not None and cfg.model.config is None:
        source = resolve_init_source(cfg.model.init_from)
    validate(_as_model_dir(cfg, source), needs_train_data=False)
    validate_finetune(cfg)
    layout = batch_layout(cfg.train, launch.world_size)
    model_section = _as_model_dir(cfg, source).model
    tokenizer = load_tokenizer(model_section)
    chat = None
    if f.task == "sft":
        if not getattr(tokenizer, "is_fast", False):
            raise ConfigError("finetune.task=sft needs a fast tokenizer (tokenizer.json) for token offsets")
        chat = ChatFormat(tokenizer, f.chat_template)
    if f.task == "masked_lm":
        require_mask_token(tokenizer, "finetune.task=masked_lm")
    check_output_dir(Path(cfg.run.output_dir))

    if source is not None and source.checkpoint is not None:
        _require_module(
            "ds_train.convert.to_hf", "model.init_from naming a ds_train run (checkpoint conversion)"
        )
    if f.adapter == "lora" and f.export_hf:
        _require_module("ds_train.convert.lora", "finetune.adapter=lora with export_hf (saving the adapters)")
    tok_sha = tokenizer_fingerprint(tokenizer)["sha256"]
    shard_sets = None
    if cfg.data.train:
        specs, class_names = {}, []
        shard_sets = _sft_shard_sets(cfg, tok_sha, chat)
        # the loader's plan fingerprint: what pretraining's data state records, checked on resume
        fp = build_plan(
            cfg.data.train,
            seed=cfg.data_seed,
            shuffle=cfg.data.shuffle,
            window=cfg.data.shuffle_window,
            shard_sets=shard_sets["train"],
        ).fingerprint
    else:
        specs = split_specs(f)
        class_names = check_examples(f, specs, chat)
        if isinstance(f.class_weights, list) and len(f.class_weights) != len(class_names):
            raise ConfigError(
                f"finetune.class_weights has {len(f.class_weights)} weights for {len(class_names)} classes "
                f"{class_names}"
            )
        fp = data_fingerprint(
            f, specs, tokenizer_sha256=tok_sha, chat=chat, class_names=class_names,
            document_start=document_start(tokenizer),
        )  # fmt: skip
    hf_config = task_hf_config(
        f.task, model_section, None if source is None else source.config_dir, tokenizer, class_names
    )
    check_checkpointing_layers(cfg.model.activation_checkpointing_layers, hf_config)
    check_residual_init(model_section, hf_config)
    check_positions(hf_config, f.seq_len, "finetune.seq_len")
    check_lora_targets(TASK_MODELS[f.task], hf_config, f)
    pre = FinetunePreflight(
        launch, layout, tokenizer, hf_config, None, source, specs, chat, class_names, fp, shard_sets
    )
    has_valid = "valid" in (pre.shard_sets if pre.shard_sets is not None else pre.specs)
    check_best_settings(cfg, has_validation=has_valid, task=cfg.finetune.task)
    if cfg.train.epochs is not None:
        resolve_epochs(cfg, _train_rows(cfg, pre), "the train split")
    pre.resume_from = _resume_point(cfg, pre, tok_sha)
    return pre


def _train_rows(cfg: Config, pre: FinetunePreflight) -> int:
    """Rows of one pass over the training data: the SFT shard sets' rows, or the tokenized train
    split's (read from the run directory when built from the same inputs, else tokenized here in
    memory: every rank does it once, at the first start)."""
    if pre.shard_sets is not None:
        return sum(s.num_rows for s in pre.shard_sets["train"])
    stats = split_stats(
        cfg.run.output_dir, "train", cfg.finetune, pre.specs["train"], pre.tokenizer, pre.chat,
        pre.class_names, pre.data_fingerprint,
    )  # fmt: skip
    return int(stats["rows"])


def check(cfg: Config, *, world_size: int | None = None) -> FinetunePreflight:
    """What `ds-train finetune --check` runs: the preflight and what this machine must offer
    (train.session.check_startup), with no process group; `world_size` as in pretrain.check."""
    pre = preflight(cfg, launch_for_check(world_size))
    check_startup(cfg, pre)
    # JSON lines are tokenized at the start; do it now, so a split that truncation or templates
    # leave empty is refused here, on a login node, and not after the job waited in the queue
    pre.split_stats = {
        split: split_stats(
            cfg.run.output_dir,
            split,
            cfg.finetune,
            spec,
            pre.tokenizer,
            pre.chat,
            pre.class_names,
            pre.data_fingerprint,
        )
        for split, spec in pre.specs.items()
    }
    return pre


def _resume_point(cfg: Config, pre: FinetunePreflight, tok_sha: str) -> CheckpointRef | None:
    run_dir = Path(cfg.run.output_dir)
    ref = start_point(cfg.run)
    if ref is None:
        return None
    state = ref.state()
    named = described(ref, run_dir)
    check_resume(
        state,
        where=named.where,
        remedy=named.remedy,
        model_sig=model_signature(pre.hf_config),
        tokenizer_sha=tok_sha,
        objective=cfg.finetune.task,
        global_batch_size=cfg.train.global_batch_size,
        force=cfg.run.force_resume,
        zero_stage=cfg.zero.stage,
        # LoRA trains no embedding table (peft's lora_embedding_A/B are matrices, decayed either
        # way): the parameter groups are the same whatever the setting, so a flip is no mismatch
        decay_embeddings=state.get("decay_embeddings", True)
        if cfg.finetune.adapter == "lora"
        else cfg.train.embedding_weight_decay,
    )
    saved, now = state.get("finetune") or {}, pre.finetune_state(cfg)
    for key in RESUME_KEYS:
        if key in saved and saved[key] != now[key]:
            raise ConfigError(
                f"{named.where} holds a checkpoint (step {ref.step}) trained with finetune {key} {saved[key]!r} "
                f"(this run: {now[key]!r}): {named.remedy}"
            )
    # Another world size is fine: the example order depends on the global batch only, and the
    # session resumes such a checkpoint through DeepSpeed's universal format (convert/reshard.py).
    check_data_resume(
        state,
        where=str(ref.path),
        instead=named.instead,
        fingerprint_now=pre.data_fingerprint,
        seq_len=None,
        seed=cfg.data_seed,
        # shards: pretraining's loader and window; JSON lines: one permutation of all rows
        order=order_settings(cfg.data.shuffle, cfg.data.shuffle_window if cfg.data.train else 1),
        force=cfg.run.force_resume,
        changed="other data: the contents of finetune.train_file/valid_file (or the data.train shards), "
        "the tokenizer or an option that shapes the examples (seq_len, packing, fields, template, "
        "labels) changed, or (masked_lm) ds-train's document framing: since 2026-12-07 each document "
        "starts with the tokenizer's BOS where it adds one, as RoBERTa's does",
        stream="example",
    )
    return ref


def _sft_shard_sets(cfg: Config, tok_sha: str, chat: ChatFormat) -> dict[str, list[ShardSet]]:
    """The manifests of data.train/data.valid, which must be SFT shards made for this run: same
    tokenizer, seq_len, chat template and train_on_inputs (the rows were rendered by them)."""
    f = cfg.finetune
    out = {}
    for split, spec in (("train", cfg.data.train), ("valid", cfg.data.valid)):
        if spec in (None, "", []):
            continue
        try:
            sets = load_shard_sets(spec)
        except DataError as e:
            raise ConfigError(f"data.{split}: {e}") from None
        for s in sets:
            where = f"data.{split}: {s.location}"
            if s.sft is None:
                raise ConfigError(
                    f"{where} holds pretraining shards without loss masks; make SFT shards with "
                    "`ds-train shard --sft` (or use finetune.train_file)"
                )
            if s.tokenizer.get("sha256") != tok_sha:
                raise ConfigError(f"{where} was tokenized with another tokenizer than this run's")
            if s.seq_len != f.seq_len:
                raise ConfigError(f"{where} has seq_len {s.seq_len}, finetune.seq_len is {f.seq_len}")
            for key, ours in (("chat_template", chat.name), ("train_on_inputs", f.train_on_inputs)):
                if s.sft.get(key) != ours:
                    raise ConfigError(
                        f"{where} was rendered with {key}={s.sft.get(key)}, this run has {key}={ours} "
                        "(reshard with the matching `ds-train shard --sft` options, or change finetune.*)"
                    )
        out[split] = sets
    return out


def _as_model_dir(cfg: Config, source: InitSource | None) -> Config:
    """The config as pretraining's checks see it: init_from an HF config dir, the tokenizer explicit."""
    if source is None:
        return cfg
    model = dataclasses.replace(
        cfg.model, init_from=source.config_dir, tokenizer=cfg.model.tokenizer or source.tokenizer_dir
    )
    return dataclasses.replace(cfg, model=model)


def _absolute(value):
    files = file_list(value)
    if not files:
        return value
    return files if isinstance(value, list) else files[0]


def _require_module(name: str, needed_for: str) -> None:
    """Fail before training, not after it, when a part this run needs is missing."""
    try:
        found = importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        found = False
    if not found:
        raise ConfigError(f"{needed_for} needs {name}, which this installation of ds_train lacks")
