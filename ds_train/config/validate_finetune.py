"""Checks of the `finetune` section (`ds-train finetune` only), beyond types; each raises
ConfigError with one line, before any process group starts or any file is written."""

from __future__ import annotations

import math
from pathlib import Path

from ds_train.config.loader import ConfigError
from ds_train.config.schema import Config


def validate_finetune(cfg: Config) -> None:
    """Checks of the `finetune` section (`ds-train finetune` only); raise ConfigError (one line)."""
    f = cfg.finetune
    if cfg.train.batch_ramp:
        raise ConfigError(
            "train.batch_ramp is for pretraining: fine-tuning runs are short and their batches, epochs and "
            "example order assume one global batch; remove it"
        )
    if cfg.data.downstream:
        raise ConfigError(
            "data.downstream (multiple-choice tasks) is scored in ds-train pretrain runs; remove it"
        )
    if cfg.data.train and f.task != "sft":
        raise ConfigError(
            f"ds-train finetune (task {f.task}) reads examples from finetune.train_file (JSON lines), not "
            "data.train; continued masked-LM pretraining on shards is `ds-train pretrain` with "
            "model.init_from and model.objective=masked_lm"
        )
    if cfg.data.train:  # SFT shards (`ds-train shard --sft`): the shard sets are checked in preflight
        if f.train_file not in (None, "", []) or f.valid_file not in (None, "", []) or f.valid_fraction:
            raise ConfigError(
                "set either data.train/data.valid (SFT shards) or finetune.train_file/valid_file/"
                "valid_fraction (JSON lines), not both"
            )
    elif f.train_file in (None, "", []):
        raise ConfigError(
            "missing required key 'finetune.train_file' (a JSON-lines file of examples; "
            "for task sft, data.train may name SFT shards instead)"
        )
    elif cfg.data.valid:
        raise ConfigError(
            "data.valid goes with data.train (SFT shards); with JSON lines use finetune.valid_file"
        )
    for key in ("train_file", "valid_file"):
        for path in _file_list(getattr(f, key), f"finetune.{key}"):
            if not Path(path).is_file():
                raise ConfigError(f"finetune.{key}: file not found: {path}")
            if not path.endswith((".jsonl", ".jsonl.gz")):
                raise ConfigError(f"finetune.{key}: {path} is not a JSON-lines file (.jsonl or .jsonl.gz)")
    if not 0 <= f.valid_fraction < 1:
        raise ConfigError(f"finetune.valid_fraction must be within [0, 1), got {f.valid_fraction}")
    if f.valid_fraction and f.valid_file not in (None, "", []):
        raise ConfigError("set one of 'finetune.valid_file' and 'finetune.valid_fraction', not both")
    if f.seq_len < 8:
        raise ConfigError(f"finetune.seq_len must be ≥ 8, got {f.seq_len}")
    if len({str(label) for label in f.labels}) != len(f.labels):
        raise ConfigError(f"finetune.labels has duplicates: {f.labels}")
    if f.labels and f.task != "classification":
        raise ConfigError(f"finetune.labels only applies to task classification (task is {f.task})")
    cw = f.class_weights
    if isinstance(cw, list):
        if not cw or not all(
            isinstance(w, (int, float)) and not isinstance(w, bool) and 0 < w < math.inf for w in cw
        ):
            raise ConfigError(f"finetune.class_weights: a list must hold positive numbers, got {cw}")
    elif cw not in ("none", "balanced"):
        raise ConfigError(f"finetune.class_weights must be none, balanced or a list of numbers, got {cw!r}")
    if cw != "none" and f.task != "classification":
        raise ConfigError(f"finetune.class_weights only applies to task classification (task is {f.task})")
    if f.text_pair_field and f.task != "classification":
        raise ConfigError(f"finetune.text_pair_field only applies to task classification (task is {f.task})")
    if cfg.model.z_loss and f.task == "classification":  # no softmax over a vocabulary to act on
        raise ConfigError(
            "model.z_loss applies to language-model objectives, not finetune.task=classification"
        )
    if f.text_pair_field is not None and f.text_pair_field in ("", f.text_field):
        raise ConfigError(
            f"finetune.text_pair_field must name a field other than text_field, got {f.text_pair_field!r}"
        )
    if f.adapter == "lora":
        if cfg.model.init_from is None:
            raise ConfigError(
                "finetune.adapter=lora needs a trained base model in 'model.init_from' (LoRA freezes it)"
            )
        if f.lora_r <= 0:
            raise ConfigError(f"finetune.lora_r must be > 0, got {f.lora_r}")
        if f.lora_alpha <= 0:
            raise ConfigError(f"finetune.lora_alpha must be > 0, got {f.lora_alpha}")
        if not 0 <= f.lora_dropout < 1:
            raise ConfigError(f"finetune.lora_dropout must be within [0, 1), got {f.lora_dropout}")
        if cfg.train.export_hf_every:
            raise ConfigError(
                "train.export_hf_every converts checkpoints of whole models; a LoRA run's hold adapters on a "
                "frozen base: leave it at 0 and use finetune.export_hf (adapter/ and the merged hf/ at the end)"
            )
        targets = f.lora_target_modules
        if not (
            targets == "all-linear"
            or (isinstance(targets, list) and targets and all(isinstance(t, str) and t for t in targets))
        ):
            raise ConfigError(
                f"finetune.lora_target_modules must be 'all-linear' or a list of module names, got {targets!r}"
            )


def _file_list(value, key: str) -> list[str]:
    if value in (None, "", []):
        return []
    items = value if isinstance(value, list) else [value]
    if not all(isinstance(v, str) and v.strip() for v in items):
        raise ConfigError(f"{key} must be a path or a list of paths, got {value!r}")
    return items
