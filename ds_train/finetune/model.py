"""The model a fine-tuning task trains: the task's HF class, loaded from an HF directory (or built
fresh from a config, e.g. for a from-scratch baseline), with new parameters initialised
independently of the ZeRO stage.

A task head the base model lacks (a classifier, an MLM head) is created by transformers while
loading; under ZeRO-3 that happens inside `zero.Init`, where the draw order and device differ
from stages 0-2. Like `model.init.initialize_weights` for fresh models, each new module is
re-drawn on the CPU from a seed derived from (run seed, module name), so every stage and world
size starts from the same weights.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import defaultdict
from collections.abc import Iterable

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    PretrainedConfig,
)

from ds_train.config.schema import ModelSection
from ds_train.distributed.engine import gathered, is_partitioned
from ds_train.model.blocks import apply_block_options
from ds_train.model.build import load_hf_config, make_causal, model_without_init, residual_init_for
from ds_train.model.init import initialize_weights, module_seed

log = logging.getLogger(__name__)

TASK_MODELS = {
    "sft": AutoModelForCausalLM,
    "classification": AutoModelForSequenceClassification,
    "masked_lm": AutoModelForMaskedLM,
}


def task_hf_config(
    task: str, section: ModelSection, config_dir: str | None, tokenizer, class_names: list[str]
) -> PretrainedConfig:
    """The HF config of the model to train: the base's (or `model.config`'s) plus the task's labels."""
    source = section if config_dir is None else dataclasses.replace(section, init_from=config_dir)
    config = load_hf_config(source, tokenizer)
    if task == "sft":
        make_causal(config)
    if task == "classification":
        config.num_labels = len(class_names)
        config.id2label = dict(enumerate(class_names))
        config.label2id = {name: i for i, name in enumerate(class_names)}
        config.problem_type = "single_label_classification"
        if getattr(config, "pad_token_id", None) is None:
            # decoder classifiers pool the last non-pad token and need to know which id pads
            config.pad_token_id = (
                tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
            )
    return config


def build_task_model(
    task: str,
    section: ModelSection,
    config: PretrainedConfig,
    *,
    weights_dir: str | None,
    seed: int,
    rank: int,
) -> torch.nn.Module:
    """The task model in fp32; hold `HfZeroContext` around this for ZeRO-3 (as for pretraining)."""
    cls = TASK_MODELS[task]
    kwargs = {"attn_implementation": section.attn_implementation, "dtype": torch.float32}
    if weights_dir is not None:
        # ignore_mismatched_sizes: a classifier re-fine-tuned for another number of classes gets
        # its head drawn afresh, like a head the base lacks (transformers refuses it otherwise)
        model, info = cls.from_pretrained(
            weights_dir,
            config=config,
            local_files_only=True,
            output_loading_info=True,
            ignore_mismatched_sizes=True,
            **kwargs,
        )
        mismatched = [m[0] for m in info.get("mismatched_keys", ())]
        if mismatched and rank == 0:
            log.warning(
                "%s holds %s with another shape than this task's (e.g. another number of classes): "
                "drawn afresh",
                weights_dir,
                ", ".join(mismatched),
            )
        initialize_new_parameters(model, [*info["missing_keys"], *mismatched], seed, rank)
    else:
        model = model_without_init(cls, config, **kwargs)
        initialize_weights(model, seed, rank, residual_init_for(section, model))
    model.config.use_cache = False
    apply_block_options(model, section)
    return model


@torch.no_grad()
def initialize_new_parameters(model: torch.nn.Module, missing: Iterable[str], seed: int, rank: int) -> None:
    """Re-draw the parameters the checkpoint lacked, per module, from (seed, module name).

    A parameter tied to a loaded one (an MLM decoder sharing the word embeddings) is kept."""
    missing = set(missing)
    names_of: dict[int, list[str]] = defaultdict(list)
    for name, p in model.named_parameters(remove_duplicate=False):
        names_of[id(p)].append(name)
    fresh = {pid for pid, names in names_of.items() if all(n in missing for n in names)}
    modules = sorted({n.rsplit(".", 1)[0] for n in missing if "." in n})
    for module_name in modules:
        module = model.get_submodule(module_name)
        params = list(module.parameters(recurse=False))
        if not any(id(p) in fresh for p in params):
            continue
        partitioned = any(is_partitioned(p) for p in params)
        with gathered(params, modifier_rank=0):
            if partitioned and rank != 0:
                continue  # rank 0 draws; the values are broadcast and re-partitioned on exit
            originals = [p.data for p in params]
            for p in params:
                p.data = p.data.detach().to("cpu", torch.float32).clone()
                p._is_hf_initialized = False  # transformers skips tensors flagged as done
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(module_seed(seed, module_name))
                model._init_weights(module)
            for p, orig in zip(params, originals):
                if id(p) in fresh:
                    orig.copy_(p.data)
                p.data = orig
                p._is_hf_initialized = True
