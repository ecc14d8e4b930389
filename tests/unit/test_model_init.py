"""Stage-independent initialisation and PaLM FLOPs."""

from __future__ import annotations

import json
import math

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from ds_train.model.flops import flops_per_token, matmul_params
from ds_train.model.init import initialize_weights
from tests.helpers import MICRO_LLAMA


def _model(seed_for_construction: int):
    raw = json.loads(MICRO_LLAMA.read_text())
    cfg = AutoConfig.for_model(raw.pop("model_type"), vocab_size=256, **raw)
    torch.manual_seed(seed_for_construction)  # construction order/seed must not matter
    return AutoModelForCausalLM.from_config(cfg)


def test_weights_depend_on_run_seed_not_on_construction():
    a, b, c = _model(1), _model(2), _model(3)
    initialize_weights(a, seed=7, rank=0)
    initialize_weights(b, seed=7, rank=0)
    initialize_weights(c, seed=8, rank=0)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
        if pa.ndim == 2:
            assert not torch.equal(pa, pc), name
    emb = a.get_input_embeddings().weight
    assert abs(emb.std().item() - a.config.initializer_range) < 0.005
    norm = a.model.norm.weight
    assert torch.equal(norm, torch.ones_like(norm))


def test_fresh_model_loss_is_ln_vocab():
    m = _model(0)
    initialize_weights(m, seed=1, rank=0)
    ids = torch.randint(0, 256, (2, 16))
    loss = m(input_ids=ids, labels=ids).loss.item()
    assert abs(loss - math.log(256)) / math.log(256) < 0.05


def test_palm_flops_formula():
    m = _model(0)
    c = m.config
    total = sum(p.numel() for p in m.parameters())
    n = total - m.get_input_embeddings().weight.numel()  # untied head counts, input embedding not
    assert matmul_params(m) == n
    assert (
        flops_per_token(m, 128)
        == 6 * n
        + 12 * c.num_hidden_layers * c.num_attention_heads * (c.hidden_size // c.num_attention_heads) * 128
    )


def test_checkpointing_the_first_blocks_recomputes_only_them_and_keeps_the_gradients():
    """model.activation_checkpointing_layers=K: blocks 0..K-1 run their MLP twice (once more in
    backward), the rest once, and the gradients are those of the model without checkpointing."""
    import pytest

    from ds_train.config import ConfigError
    from ds_train.model.build import enable_activation_checkpointing

    def grads_and_forwards(layers):
        m = _model(0)
        initialize_weights(m, seed=3, rank=0)
        m.config.use_cache = False
        if layers is not None:
            enable_activation_checkpointing(m, layers)
        m.train()
        calls = [0] * len(m.model.layers)
        # inside the block, where a recompute runs again; a pre-hook, since the recompute stops
        # once it has regenerated the last saved tensor (torch's early stop), before the MLP returns
        for i, block in enumerate(m.model.layers):
            block.mlp.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
        x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
        m(input_ids=x, labels=x).loss.backward()
        return {n: p.grad for n, p in m.named_parameters()}, calls

    blocks = _model(0).config.num_hidden_layers
    assert blocks >= 2
    plain, plain_calls = grads_and_forwards(None)
    first, first_calls = grads_and_forwards(1)
    every, every_calls = grads_and_forwards(0)  # 0: all blocks
    assert plain_calls == [1] * blocks
    assert first_calls == [2] + [1] * (blocks - 1)
    assert every_calls == [2] * blocks
    for name, g in plain.items():
        torch.testing.assert_close(first[name], g, rtol=0, atol=0, msg=name)
        torch.testing.assert_close(every[name], g, rtol=0, atol=0, msg=name)
    with pytest.raises(ConfigError, match=f"has {blocks} checkpointable blocks"):
        enable_activation_checkpointing(_model(0), blocks + 1)
