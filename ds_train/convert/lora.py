"""LoRA adapters: saving them from a ZeRO run, and merging them into their base model.

Under ZeRO-3 each rank holds only a slice of every parameter, so peft's `save_pretrained` on a
partitioned model writes empty tensors (peft #2450, #2500). `save_lora_adapters` gathers the
trainable (adapter) parameters first — a collective every rank calls — and rank 0 writes them in
peft's format. `merge_lora_adapters` works offline on full weights: base model + adapters →
`merge_and_unload` → a plain Hugging Face directory, written atomically.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from ds_train.convert.hf_dir import copy_tokenizer, with_kv_cache
from ds_train.convert.zero_layout import CheckpointError
from ds_train.distributed.engine import gathered

TASK_CONFIG = "task_config.json"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@torch.no_grad()
def save_lora_adapters(model: torch.nn.Module, out_dir: str | os.PathLike) -> Path | None:
    """Write the adapters of a peft model (ZeRO-partitioned or not) to `out_dir` on rank 0.

    Collective under ZeRO-3: every rank must call it. Returns the directory on rank 0, else None.
    """
    import torch.distributed as dist
    from peft import get_peft_model_state_dict

    peft_model = _peft_model(model)
    is_main = not dist.is_initialized() or dist.get_rank() == 0
    full: dict[str, torch.Tensor] = {}
    for name, p in peft_model.named_parameters():
        if not p.requires_grad:
            continue
        with gathered([p]):
            if is_main:
                full[name] = p.data.detach().to("cpu", copy=True)
    if not is_main:
        return None
    adapters = get_peft_model_state_dict(peft_model, state_dict=full)
    empty = [k for k, v in adapters.items() if v.numel() == 0]
    if not adapters or empty:
        raise RuntimeError(f"LoRA adapters would be saved empty ({len(empty)} of {len(adapters)} tensors)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # save_pretrained extracts the adapter tensors from a model-style state dict itself
    peft_model.save_pretrained(str(out), state_dict=full, safe_serialization=True)
    # The task model's config (label names, head size): the base directory only has its own,
    # and a merge needs the head the adapters were trained with.
    peft_model.get_base_model().config.to_json_file(str(out / TASK_CONFIG))
    return out


def _peft_model(model: torch.nn.Module):
    from peft import PeftModel

    module = getattr(model, "module", model)  # a DeepSpeed engine wraps the model
    if not isinstance(module, PeftModel):
        raise TypeError(f"save_lora_adapters needs a peft model, got {type(module).__name__}")
    return module


def merge_lora_adapters(
    adapter_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    base: str | None = None,
    dtype: str | None = None,
) -> Path:
    """base + LoRA adapters → a merged Hugging Face directory (atomically replaces `out_dir`)."""
    from peft import PeftConfig, PeftModel
    from transformers import AutoConfig

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise CheckpointError(f"{adapter_dir}: no adapter_config.json (not a peft adapter directory)")
    peft_config = PeftConfig.from_pretrained(str(adapter_dir))
    base_dir = Path(base or peft_config.base_model_name_or_path or "")
    if not (base_dir / "config.json").is_file():
        raise CheckpointError(
            f"base model not found: {base_dir} (pass --base with the HF directory the adapters "
            "were trained on)"
        )
    task_config = adapter_dir / TASK_CONFIG
    config = AutoConfig.from_pretrained(
        str(task_config if task_config.is_file() else base_dir), local_files_only=True
    )
    cls = _task_class(peft_config.task_type, config)
    torch_dtype = DTYPES[dtype] if dtype else torch.float32
    # A new task head (e.g. 3 labels on a 2-label base) is missing from, or mismatched with, the
    # base weights; that is fine only where the adapters bring their own copy (modules_to_save).
    model, info = cls.from_pretrained(
        str(base_dir),
        config=config,
        dtype=torch_dtype,
        local_files_only=True,
        ignore_mismatched_sizes=True,
        output_loading_info=True,
    )
    saved = tuple(peft_config.modules_to_save or ())
    not_given = [
        k
        for k in [*info.get("missing_keys", ()), *(m[0] for m in info.get("mismatched_keys", ()))]
        if not any(k == m or k.startswith(m + ".") or f".{m}." in f".{k}" for m in saved)
    ]
    if not_given:
        raise CheckpointError(
            f"the base model {base_dir} lacks (or has another shape for) {len(not_given)} weights the "
            f"adapters do not carry, e.g. {not_given[0]}: is --base the model they were trained on?"
        )
    model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
    merged = model.merge_and_unload()
    merged.config.architectures = [type(merged).__name__]
    with_kv_cache(merged)  # the adapter's training config had turned it off
    out = Path(out_dir).absolute()
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        merged.save_pretrained(str(tmp), safe_serialization=True)
        if not copy_tokenizer(adapter_dir, tmp):
            copy_tokenizer(base_dir, tmp)
        (tmp / "merged_from.json").write_text(
            json.dumps({"base": str(base_dir), "adapter": str(adapter_dir)}, indent=1)
        )
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def _task_class(task_type, config):
    import transformers

    by_task = {
        "CAUSAL_LM": "AutoModelForCausalLM",
        "SEQ_CLS": "AutoModelForSequenceClassification",
        "TOKEN_CLS": "AutoModelForTokenClassification",
        "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
        "FEATURE_EXTRACTION": "AutoModel",
    }
    name = by_task.get(str(getattr(task_type, "value", task_type)))
    if name is not None:
        return getattr(transformers, name)
    for arch in config.architectures or []:
        if hasattr(transformers, arch):
            return getattr(transformers, arch)
    return transformers.AutoModel
