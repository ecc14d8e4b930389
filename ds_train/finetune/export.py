"""The end of a fine-tuning run: `<output_dir>/hf`, a Hugging Face directory stock transformers
loads (LoRA merged in), with the tokenizer and a model card; LoRA adapters also in
`<output_dir>/adapter` (peft format, for `ds-train convert merge-lora` or PeftModel.from_pretrained).

The trained weights are gathered once to rank 0 (a collective under ZeRO-3, so every rank calls
`gather_full_state`), loaded into a plain CPU copy of the task model (with the same LoRA
structure), merged with peft's `merge_and_unload` and saved with `save_pretrained`. Loading the
gathered state with strict key checking means a missing or misnamed tensor fails the export
instead of shipping re-initialised weights.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ds_train.config.schema import FinetuneSection
from ds_train.convert.hf_dir import with_kv_cache
from ds_train.distributed.engine import gathered
from ds_train.finetune.lora import lora_config
from ds_train.finetune.model import TASK_MODELS
from ds_train.model.build import model_without_init

log = logging.getLogger(__name__)

HF_DIR = "hf"
ADAPTER_DIR = "adapter"


@torch.no_grad()
def gather_full_state(module: torch.nn.Module, *, keep: bool) -> dict[str, torch.Tensor] | None:
    """Every parameter (under each tied name) and buffer as full CPU tensors where `keep` (rank 0).

    Collective under ZeRO-3: every rank must call it, in the same order."""
    state: dict[str, torch.Tensor] | None = {} if keep else None
    for name, p in module.named_parameters(remove_duplicate=False):
        with gathered([p]):
            if state is not None:
                state[name] = p.data.detach().to("cpu", torch.float32, copy=True)
    if state is not None:
        for name, b in module.named_buffers():
            state[name] = b.detach().to("cpu", copy=True)
    return state


def save_merged_model(
    state: dict[str, torch.Tensor], section: FinetuneSection, hf_config, tokenizer, out_dir: Path
) -> torch.nn.Module:
    """Rebuild the task model on the CPU from the gathered state, merge LoRA, save; returns the model.

    Call with no HfZeroContext alive (the copy must not be partitioned)."""
    # every weight comes from `state`: built without transformers' draws (model_without_init)
    model = model_without_init(TASK_MODELS[section.task], hf_config, dtype=torch.float32)
    if section.adapter == "lora":
        from peft import get_peft_model

        model = get_peft_model(model, lora_config(section))
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    if missing:
        raise RuntimeError(
            f"export: the trained model has no tensor for {len(missing)} keys, e.g. {missing[0]}"
        )
    model.load_state_dict({k: state[k] for k in expected}, strict=True)
    if section.adapter == "lora":
        model = model.merge_and_unload()
    with_kv_cache(model)
    model.config.architectures = [type(model).__name__]
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
    log.info("exported the fine-tuned model to %s", out_dir)
    return model
