"""LoRA adapters through peft: wrap the task model before the DeepSpeed engine is built.

peft freezes the base model and adds low-rank `lora_A`/`lora_B` pairs to the target modules; for
classification the new head is trained in full (peft's `modules_to_save`). Under ZeRO-3 the base
weights are already partitioned when peft wraps them; the adapters are created as ordinary tensors
and partitioned by the engine. The adapters are drawn under a fixed seed (not the per-rank one), so
every rank and ZeRO stage starts from the same adapter weights.
"""

from __future__ import annotations

import torch

from ds_train.config.schema import FinetuneSection
from ds_train.model.init import module_seed

PEFT_TASK_TYPES = {"sft": "CAUSAL_LM", "classification": "SEQ_CLS", "masked_lm": None}


def lora_config(section: FinetuneSection):
    from peft import LoraConfig

    targets = section.lora_target_modules
    return LoraConfig(
        r=section.lora_r,
        lora_alpha=section.lora_alpha,
        lora_dropout=section.lora_dropout,
        target_modules=targets if targets == "all-linear" else list(targets),
        task_type=PEFT_TASK_TYPES[section.task],
        bias="none",
    )


def apply_lora(model: torch.nn.Module, section: FinetuneSection, seed: int) -> torch.nn.Module:
    """The peft-wrapped model; raises ValueError (from peft) when no target module matches."""
    from peft import get_peft_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(module_seed(seed, "lora"))
        return get_peft_model(model, lora_config(section))


def check_lora_targets(model_cls, hf_config, section: FinetuneSection) -> None:
    """Refuse `finetune.lora_target_modules` that match nothing in the model, before anything
    starts (`--check` included): peft's own matching, on the model built on the meta device (no
    memory, no weights), so the rule is the one the run would meet."""
    from ds_train.config.loader import ConfigError

    if section.adapter != "lora" or section.lora_target_modules == "all-linear":
        return
    from peft import get_peft_model

    with torch.device("meta"):
        model = model_cls.from_config(hf_config)
    try:
        get_peft_model(model, lora_config(section))
    except ValueError as e:  # peft's words vary by release; name what the model does have
        linear = sorted(
            {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        )
        raise ConfigError(
            f"finetune.lora_target_modules={section.lora_target_modules} matches no layer of "
            f"{type(model).__name__} (its linear layers: {', '.join(linear)}; or use all-linear). "
            f"peft: {str(e).strip().splitlines()[0][:120]}"
        ) from None


def trainable_summary(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, over full (not partitioned) shapes."""
    trainable = total = 0
    for p in model.parameters():
        n = getattr(p, "ds_numel", p.numel())
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total
