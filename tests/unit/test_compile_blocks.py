"""model.compile: each transformer block compiled in place, all blocks sharing one graph, while the
model's own forward, its parameter names and its chunked head loss stay as they were."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from ds_train.config import ConfigError
from ds_train.model.blocks import compile_blocks, enable_activation_checkpointing
from ds_train.objectives.head_loss import fused_head
from tests.helpers import MICRO_LLAMA


def _model() -> torch.nn.Module:
    raw = json.loads(MICRO_LLAMA.read_text())
    config = AutoConfig.for_model(raw.pop("model_type"), vocab_size=256, **raw)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    model.config.use_cache = False
    return model


def _loss_and_grads(model: torch.nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    positions = torch.arange(16).repeat(2, 1)
    positions[0, 9:] -= 9  # two documents in the first row: the block-diagonal mask is an input
    loss = model(input_ids=x, position_ids=positions, labels=x).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("checkpoint_layers", [None, 1])
def test_compiled_blocks_share_one_graph_and_train_like_eager(checkpoint_layers):
    from torch._dynamo.utils import counters

    eager, compiled = _model(), _model()
    if checkpoint_layers is not None:  # a checkpointed block checkpoints its compiled call
        for m in (eager, compiled):
            enable_activation_checkpointing(m, checkpoint_layers)
    torch._dynamo.reset()
    counters.clear()
    # aot_eager: dynamo's graph and AOTAutograd's backward, without inductor's minute of C++ builds
    assert compile_blocks(compiled, backend="aot_eager") == compiled.config.num_hidden_layers >= 2
    loss, grads = _loss_and_grads(compiled)
    want_loss, want_grads = _loss_and_grads(eager)
    torch.testing.assert_close(loss, want_loss)
    for name, grad in want_grads.items():
        torch.testing.assert_close(grads[name], grad, msg=name)
    # one graph for every block (parameters are graph inputs), not one per block
    assert counters["stats"]["unique_graphs"] == (1 if checkpoint_layers is None else 2)
    assert compiled._compiled_call_impl is None  # the model's forward itself stays eager
    assert list(compiled.state_dict()) == list(eager.state_dict())  # no _orig_mod. prefix
    assert fused_head(compiled) is compiled.lm_head  # so the head keeps its chunked loss


def test_whole_model_compile_is_what_loses_the_chunked_head_loss():
    model = _model()
    model.compile(backend="eager")
    assert fused_head(model) is None


def test_a_model_without_blocks_is_refused():
    with pytest.raises(ConfigError, match="no transformer blocks"):
        compile_blocks(torch.nn.Sequential(torch.nn.Linear(4, 4)))
