"""The optimizer's parameter groups: weight decay on matrices only, and on the embedding tables
only while train.embedding_weight_decay is on (OLMo 2 turns it off)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM

from ds_train.train.optimizer_groups import param_groups
from tests.helpers import MICRO_LLAMA


def _llama():
    raw = json.loads(MICRO_LLAMA.read_text())
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(raw.pop("model_type"), vocab_size=64, **raw))


def _gpt2():  # tied head; learned positions
    cfg = AutoConfig.for_model("gpt2", n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=32)
    return AutoModelForCausalLM.from_config(cfg)


def _bert():  # positions and token types
    cfg = AutoConfig.for_model(
        "bert",
        num_hidden_layers=1,
        hidden_size=16,
        num_attention_heads=2,
        intermediate_size=32,
        vocab_size=64,
    )
    return AutoModelForMaskedLM.from_config(cfg)


def _names(model: torch.nn.Module, group: dict) -> set[str]:
    ids = {id(p) for p in group["params"]}
    return {n for n, p in model.named_parameters() if id(p) in ids}


@pytest.mark.parametrize(
    ("build", "embeddings"),
    [
        (_llama, {"model.embed_tokens.weight"}),
        (_gpt2, {"transformer.wte.weight", "transformer.wpe.weight"}),
        (
            _bert,
            {
                "bert.embeddings.word_embeddings.weight",
                "bert.embeddings.position_embeddings.weight",
                "bert.embeddings.token_type_embeddings.weight",
            },
        ),
    ],
    ids=["llama", "gpt2", "bert"],
)
def test_embedding_tables_leave_the_decayed_group_only_when_asked(build, embeddings):
    model = build()
    decayed, undecayed = param_groups(model, 0.1)
    assert embeddings <= _names(model, decayed)
    assert decayed["weight_decay"] == 0.1 and undecayed["weight_decay"] == 0.0
    assert all(p.ndim == 1 for p in undecayed["params"])  # biases and norms

    off = param_groups(model, 0.1, decay_embeddings=False)
    assert _names(model, off[0]) == _names(model, decayed) - embeddings
    assert _names(model, off[1]) == _names(model, undecayed) | embeddings
    # every trainable parameter once
    assert sum(len(g["params"]) for g in off) == len(list(model.parameters()))
    if build is _llama:  # an untied output head is a projection: still decayed
        assert "lm_head.weight" in _names(model, off[0])


def test_the_choice_reaches_the_optimizer_step():
    """One AdamW step with zero gradients: only decay moves a weight."""
    model = _gpt2()
    before = model.transformer.wte.weight.detach().clone()
    h_before = model.transformer.h[0].mlp.c_fc.weight.detach().clone()
    opt = torch.optim.AdamW(param_groups(model, 0.5, decay_embeddings=False), lr=0.1)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    assert torch.equal(model.transformer.wte.weight, before)
    assert not torch.equal(model.transformer.h[0].mlp.c_fc.weight, h_before)
