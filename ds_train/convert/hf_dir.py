"""The non-weight files of a Hugging Face directory: config.json (with `architectures` and dtype),
generation_config.json for causal LMs, and the tokenizer files."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ds_train.convert.zero_layout import CheckpointError

if TYPE_CHECKING:  # transformers is imported where used: to-hf loads it in a background thread
    from transformers import PretrainedConfig

AUTO_CLASSES = {"causal_lm": "AutoModelForCausalLM", "masked_lm": "AutoModelForMaskedLM"}
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
    "chat_template.jinja",
)


def load_config(config_path: str | Path) -> PretrainedConfig:
    from transformers import AutoConfig

    path = Path(config_path)
    try:
        return AutoConfig.from_pretrained(str(path), local_files_only=True)  # a config.json or its dir
    except Exception as e:
        raise CheckpointError(
            f"cannot read an HF config from {config_path}: {str(e).splitlines()[0]}"
        ) from None


def model_class(config: PretrainedConfig, objective: str | None):
    """The transformers class a checkpoint's weights belong to: from `architectures`, else the objective."""
    import transformers

    for arch in config.architectures or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    auto = getattr(transformers, AUTO_CLASSES.get(objective or "causal_lm", "AutoModelForCausalLM"))
    try:
        return auto._model_mapping[type(config)]
    except KeyError:
        raise CheckpointError(f"no {auto.__name__} class for model_type {config.model_type!r}") from None


def write_configs(out: Path, config: PretrainedConfig, cls, dtype: torch.dtype) -> None:
    from transformers import GenerationConfig

    config = config.__class__.from_dict(config.to_dict())
    config.architectures = [cls.__name__]
    config.dtype = dtype
    config.use_cache = True  # training turned the KV cache off; generation wants it
    config.save_pretrained(str(out))
    if getattr(cls, "can_generate", lambda: False)():
        GenerationConfig.from_model_config(config).save_pretrained(str(out))


def with_kv_cache(model: torch.nn.Module) -> None:
    """Turn the KV cache back on (training turns it off) in the config and, since generate()
    follows it, the generation config: a generation config derived while training kept
    use_cache=False and made every generated token recompute the whole prefix."""
    model.config.use_cache = True
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        generation.use_cache = True


def copy_tokenizer(src: Path | None, out: Path) -> list[str]:
    if src is None or not src.is_dir():
        return []
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, out / name)
            copied.append(name)
    return copied
