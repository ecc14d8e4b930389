"""The numbers the memory estimate needs from a model, read from its HF config without weights.

The parameter count comes from building the model on PyTorch's meta device (shapes only, no
memory, any architecture transformers knows), so it is exact, tied embeddings included; the
layer dimensions come from the config under the names the common architectures use.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ModelShape:
    params: int  # Ψ: unique parameters (tied weights once)
    layers: int
    hidden: int
    heads: int
    kv_dim: int  # key/value width: kv_heads × head_dim (GQA/MQA make it narrower than hidden)
    intermediate: int
    vocab: int
    gated_mlp: bool  # SwiGLU-style MLP (gate and up projections): 4 saved tensors of width f, not 2
    largest_layer_params: int  # a transformer block, or the embedding if larger (ZeRO-3 gathers it whole)
    head_bias: bool = False  # the output head has a bias (BERT's decoder)
    largest_param: int = 0  # elements of the biggest single parameter (usually the embedding)


def _get(cfg, *names: str, default=None):
    for name in names:
        value = getattr(cfg, name, None)
        if value is not None:
            return value
    return default


def shape_from_config(hf_config, objective: str = "causal_lm") -> ModelShape:
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    cls = AutoModelForMaskedLM if objective == "masked_lm" else AutoModelForCausalLM
    with torch.device("meta"):
        model = cls.from_config(hf_config)
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    embed = model.get_input_embeddings().weight.numel()
    layers = int(_get(hf_config, "num_hidden_layers", "n_layer"))
    hidden = int(_get(hf_config, "hidden_size", "n_embd"))
    heads = int(_get(hf_config, "num_attention_heads", "n_head"))
    head_dim = int(_get(hf_config, "head_dim", default=hidden // heads))
    kv_heads = int(_get(hf_config, "num_key_value_heads", default=heads))
    intermediate = int(_get(hf_config, "intermediate_size", "n_inner", default=None) or 4 * hidden)
    block = max(1, (total - embed) // max(1, layers))
    head = model.get_output_embeddings()
    return ModelShape(
        params=total,
        layers=layers,
        hidden=hidden,
        heads=heads,
        kv_dim=kv_heads * head_dim,
        intermediate=intermediate,
        vocab=int(hf_config.vocab_size),
        gated_mlp=_has_gate(model),
        largest_layer_params=max(block, embed),
        head_bias=getattr(head, "bias", None) is not None,
        largest_param=max(p.numel() for p in model.parameters()),
    )


def _has_gate(model: torch.nn.Module) -> bool:
    return any(name.endswith(("gate_proj", "w1", "gate_up_proj")) for name, _ in model.named_modules())
