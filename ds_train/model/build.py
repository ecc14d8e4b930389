"""Build the HF model and tokenizer a run config describes: fresh from a config JSON or loaded
from a local HF directory, never from a hub.

Under ZeRO-3 the caller must hold an `HfZeroContext` while this runs, so transformers builds the
model partitioned; `initialize_weights` then makes the fresh weights stage-independent, and
`verify_loaded_weights` checks a loaded model against its source files.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import math
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedTokenizerBase,
)

from ds_train.config.loader import ConfigError
from ds_train.config.schema import ModelSection
from ds_train.model.blocks import apply_block_options
from ds_train.model.init import ResidualScale, initialize_weights, parameter_checksums, residual_scale

log = logging.getLogger(__name__)

MODEL_CLASSES = {"causal_lm": AutoModelForCausalLM, "masked_lm": AutoModelForMaskedLM}


def load_tokenizer(section: ModelSection) -> PreTrainedTokenizerBase:
    path = section.tokenizer or section.init_from
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:  # transformers raises many types for a bad directory
        raise ConfigError(
            f"model.tokenizer: cannot load a tokenizer from {path}: {str(e).splitlines()[0]}"
        ) from None


def load_hf_config(section: ModelSection, tokenizer: PreTrainedTokenizerBase) -> PretrainedConfig:
    """The HF config, with vocabulary size and special tokens taken from the tokenizer."""
    if section.init_from:
        config = AutoConfig.from_pretrained(section.init_from, local_files_only=True)
        if len(tokenizer) > config.vocab_size:
            raise ConfigError(
                f"model.tokenizer has {len(tokenizer)} tokens but {section.init_from} "
                f"has only {config.vocab_size} embeddings"
            )
        return config
    try:
        raw = json.loads(Path(section.config).read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"model.config: {section.config} is not valid JSON ({e})") from None
    model_type = raw.pop("model_type", None)
    if model_type is None:
        raise ConfigError(f"model.config: {section.config} has no 'model_type' (e.g. \"llama\")")
    try:
        config = AutoConfig.for_model(model_type, **raw)
    except ValueError as e:
        raise ConfigError(f"model.config: {str(e).splitlines()[0]}") from None
    multiple = section.pad_vocab_multiple
    config.vocab_size = int(math.ceil(len(tokenizer) / multiple) * multiple)
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            setattr(config, attr, value)
    return config


# Encoder architectures whose causal-LM head class attends both ways unless the config says the
# model is a decoder (BertLMHeadModel and its kin follow `is_decoder`, XLM `causal`); BART-style
# ones are absent because their *ForCausalLM class makes itself a decoder.
_SELF_DECODING = {"bart", "mbart", "mvp", "plbart"}


def make_causal(config: PretrainedConfig) -> None:
    """Make an encoder architecture's config a decoder for a next-token objective (in place).

    Built as it comes, BertLMHeadModel attends to every position, so each token's target is also
    among its inputs: training "works" (the loss falls) and the model is useless for generation,
    with only transformers' hint "add `is_decoder=True`" in the log."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    kind = config.model_type
    if kind not in MODEL_FOR_MASKED_LM_MAPPING_NAMES or kind in _SELF_DECODING:
        return
    flag = "causal" if kind == "xlm" else "is_decoder"
    if not getattr(config, flag, False):
        setattr(config, flag, True)
        log.warning(
            "%s is an encoder architecture: made a decoder (%s=True) for a next-token objective, so a "
            "position cannot attend to the tokens after it",
            kind,
            flag,
        )


def build_model(
    section: ModelSection,
    config: PretrainedConfig,
    *,
    seed: int,
    rank: int,
    fresh_weights: bool = True,
) -> torch.nn.Module:
    """The model in fp32 (DeepSpeed casts for bf16/fp16). Hold HfZeroContext around this for ZeRO-3.

    `fresh_weights=False` (a resumed run, whose checkpoint replaces every weight): a model built
    from `model.config` is left uninitialised instead of drawn."""
    cls = MODEL_CLASSES[section.objective]
    kwargs = {"attn_implementation": section.attn_implementation, "dtype": torch.float32}
    if section.init_from:
        model = cls.from_pretrained(section.init_from, config=config, local_files_only=True, **kwargs)
    else:
        model = model_without_init(cls, config, **kwargs)
        if fresh_weights:
            initialize_weights(model, seed, rank, residual_init_for(section, model))
    model.config.use_cache = False
    apply_block_options(model, section)
    return model


def residual_init_for(section: ModelSection, model: torch.nn.Module) -> ResidualScale | None:
    """model.residual_init for this built model (None: the architecture's own init)."""
    try:
        return residual_scale(section.residual_init, (n for n, _ in model.named_modules()))
    except ValueError as e:
        raise ConfigError(str(e)) from None


def check_residual_init(section: ModelSection, hf_config: PretrainedConfig) -> None:
    """Refuse model.residual_init where it cannot apply, before any process group or weight exists
    (`--check` included): the module names come from the model built on the meta device."""
    if section.residual_init == "default":
        return
    if section.init_from:
        raise ConfigError(
            f"model.residual_init={section.residual_init} initialises a model built fresh from model.config; "
            "model.init_from's weights are already trained"
        )
    from transformers import AutoModel

    with torch.device("meta"):
        residual_init_for(section, AutoModel.from_config(hf_config))


def check_positions(hf_config: PretrainedConfig, seq_len: int, where: str) -> None:
    """Refuse rows longer than a model's learned position embeddings (GPT-2's `n_positions`, BERT's
    and OPT's `max_position_embeddings`): the first forward would index past the table, a bare
    IndexError deep in the model. Rotary models (a `rope_*` setting) extrapolate past
    `max_position_embeddings`: allowed, with a warning. ALiBi models (BLOOM, MPT) have neither."""
    rotary = any(getattr(hf_config, a, None) for a in ("rope_parameters", "rope_scaling", "rope_theta"))
    learned = getattr(hf_config, "n_positions", None)
    if learned is None and not rotary:
        learned = getattr(hf_config, "max_position_embeddings", None)
    if isinstance(learned, int) and seq_len > learned:
        raise ConfigError(
            f"{where} is {seq_len} tokens but the model has {learned} learned positions: "
            f"use rows of at most {learned} tokens, or a model config with more positions"
        )
    most = getattr(hf_config, "max_position_embeddings", None)
    if learned is None and isinstance(most, int) and seq_len > most:
        log.warning(
            "%s is %d tokens, past the model's max_position_embeddings=%d: its positions are "
            "extrapolated beyond what it was configured for",
            where,
            seq_len,
            most,
        )


def attention_problem(attn_implementation: str) -> str | None:
    """Why this process cannot train with `attn_implementation`, or None. Asked before the
    process group and the model exist, so a CPU run stops at once rather than at its first
    backward (FlexAttention's forward runs on a CPU, its backward does not)."""
    if attn_implementation == "flex_attention" and not torch.cuda.is_available():
        return (
            "model.attn_implementation=flex_attention needs a CUDA GPU: torch "
            f"{torch.__version__} has no FlexAttention backward on CPU. Use sdpa on CPU"
        )
    return None


def model_without_init(cls, config: PretrainedConfig, **kwargs) -> torch.nn.Module:
    """`cls.from_config` without drawing any weight. transformers draws each one twice while
    building (torch's default init in every layer's constructor, then its `_init_weights`), and
    ds_train would throw both away: `initialize_weights` redraws every weight stage-independently,
    or a resumed run loads them. For a 1B Llama on 2 CPU cores construction took 20 of the 27 s
    that building and initialising did (docs/benchmarks.md, "Start-up"). transformers' own
    no-init context skips tying as well, so the tied weights are tied here."""
    with _no_init_weights_context()():
        model = cls.from_config(config, **kwargs)
    model.tie_weights()
    return model


def _no_init_weights_context():
    """transformers' no-init context where the release keeps it (5.x, 4.x); without one the draws
    just happen (initialize_weights redraws every weight either way)."""
    for where in ("transformers.initialization", "transformers.modeling_utils"):
        try:
            return importlib.import_module(where).no_init_weights
        except (ImportError, AttributeError):
            continue
    return contextlib.nullcontext


def verify_loaded_weights(model: torch.nn.Module, source_dir: str) -> None:
    """Compare every parameter of a model loaded from `source_dir` with the safetensors on disk.

    Catches the silent re-initialisation that happens when a ZeRO-3 model is loaded without the
    DeepSpeed config alive, and any missing key that transformers filled with fresh values.
    """
    from safetensors import safe_open

    files = sorted(Path(source_dir).glob("*.safetensors"))
    if not files:
        log.warning("no *.safetensors in %s: skipping the load checksum", source_dir)
        return
    source: dict[str, tuple[float, tuple]] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            for key in fh.keys():  # noqa: SIM118 - safe_open is not a dict
                t = fh.get_tensor(key)
                source[key] = (float(t.double().abs().sum()), tuple(t.shape))
    loaded = parameter_checksums(model)
    shapes = {n: tuple(getattr(p, "ds_shape", p.shape)) for n, p in model.named_parameters()}
    mismatched = []
    for name, value in loaded.items():
        candidates = [name, *(name.split(".", 1)[1:])]  # heads may add or drop the base prefix
        found = next((source[c] for c in candidates if c in source), None)
        if found is None:
            found = next((v for k, v in source.items() if k.endswith(name) or name.endswith(k)), None)
        if found is None or found[1] != shapes[name]:
            # a head created fresh for the task (a classifier), or drawn afresh because the file's
            # has another shape (another number of classes): nothing to compare
            continue
        ref = found[0]
        if not math.isclose(value, ref, rel_tol=1e-5, abs_tol=1e-6):
            mismatched.append(f"{name} (loaded {value:.6g}, file {ref:.6g})")
    if mismatched:
        raise RuntimeError(
            f"weights loaded from {source_dir} differ from the files for "
            f"{len(mismatched)} parameters, e.g. {mismatched[0]}"
        )
