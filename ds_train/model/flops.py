"""Model FLOPs per token (PaLM appendix B) and device peaks, for MFU.

FLOPs/token = 6·N + 12·L·H·Q·T, with N the parameters that do matmuls: everything except input
embeddings (token, position, token type), plus the LM head even when it is tied to the input
embedding, since its matmul still runs. L layers, H heads, Q head dim, T sequence length. The
attention term is not halved for causal masks (PaLM's convention; Megatron-Core halves it).
"""

from __future__ import annotations

import torch

# Dense bf16/fp16 peak FLOP/s per device (vendor spec sheets, no sparsity).
PEAK_FLOPS_BF16 = {
    "H200": 989e12,
    "H100": 989e12,
    "H800": 989e12,
    "A100": 312e12,
    "A800": 312e12,
    "L40S": 362e12,
    "A10G": 125e12,
    "V100": 125e12,
}


def count_params(model: torch.nn.Module) -> tuple[int, int]:
    """(all unique parameters, parameters of input embeddings), ZeRO-3 partitions included."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += _numel(p)
    embed = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding):
            embed += _numel(module.weight)
    return total, embed


def matmul_params(model: torch.nn.Module) -> int:
    """N in the PaLM formula: non-embedding parameters + a tied LM head."""
    total, embed = count_params(model)
    n = total - embed
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    inp = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if out is not None and inp is not None and out.weight is inp.weight:
        n += _numel(out.weight)
    return n


def flops_per_token(model: torch.nn.Module, seq_len: int) -> float:
    cfg = model.config
    layers = getattr(cfg, "num_hidden_layers", None) or cfg.n_layer
    heads = getattr(cfg, "num_attention_heads", None) or cfg.n_head
    hidden = getattr(cfg, "hidden_size", None) or cfg.n_embd
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    return 6.0 * matmul_params(model) + 12.0 * layers * heads * head_dim * seq_len


def device_peak_flops(precision: str) -> float | None:
    """Known dense peak of the current GPU for bf16/fp16 training; None on CPU or unknown devices."""
    if not torch.cuda.is_available() or precision not in ("bf16", "fp16"):
        return None
    name = torch.cuda.get_device_name().upper()
    return next((v for k, v in PEAK_FLOPS_BF16.items() if k in name), None)


def _numel(p: torch.Tensor) -> int:
    return int(getattr(p, "ds_numel", 0) or p.numel())
