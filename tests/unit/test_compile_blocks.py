"""model.compile: each transformer block compiled in place, the blocks sharing their graphs, while
the model's own forward, its parameter names and its chunked head loss stay as they were."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from ds_train.config import ConfigError
from ds_train.model.blocks import compile_blocks, enable_activation_checkpointing
from ds_train.objectives.head_loss import fused_head
from tests.helpers import MICRO_LLAMA


def _model(layers: int | None = None) -> torch.nn.Module:
    raw = json.loads(MICRO_LLAMA.read_text())
    if layers is not None:
        raw["num_hidden_layers"] = layers
    config = AutoConfig.for_model(raw.pop("model_type"), vocab_size=256, **raw)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    model.config.use_cache = False
    return model


def _batch(packed: bool = True) -> dict[str, torch.Tensor]:
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    positions = torch.arange(16).repeat(2, 1)
    if packed:
        positions[0, 9:] -= 9  # two documents in the first row: the block-diagonal mask is an input
    return {"input_ids": x, "position_ids": positions, "labels": x}


def _loss_and_grads(model: torch.nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    loss = model(**_batch()).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def _compiled_cleanly(counters) -> bool:
    """Every frame dynamo met compiled: no graph break (a block falling back to eager in part) and
    no recompile limit hit (a block run eager in a new situation)."""
    return (
        counters["frames"]["total"] == counters["frames"]["ok"] > 0
        and not counters["graph_break"]
        and not counters["unimplemented"]
    )


@pytest.fixture
def dynamo_counters():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    return counters


def _checkpoint_outside_the_call() -> bool:
    """transformers 5.17 checkpoints in the block's __call__, around the compiled call; 5.25 in its
    forward, inside it (one more graph: checkpointed blocks and plain ones differ)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return "__call__" in GradientCheckpointingLayer.__dict__


@pytest.mark.parametrize("checkpoint_layers", [None, 1])
def test_compiled_blocks_share_one_graph_and_train_like_eager(checkpoint_layers, dynamo_counters):
    eager, compiled = _model(), _model()
    if checkpoint_layers is not None:  # a checkpointed block is compiled too, checkpoint and all
        for m in (eager, compiled):
            enable_activation_checkpointing(m, checkpoint_layers)
    # aot_eager: dynamo's graph and AOTAutograd's backward, without inductor's minute of C++ builds
    assert compile_blocks(compiled, backend="aot_eager") == compiled.config.num_hidden_layers >= 2
    loss, grads = _loss_and_grads(compiled)
    want_loss, want_grads = _loss_and_grads(eager)
    torch.testing.assert_close(loss, want_loss)
    for name, grad in want_grads.items():
        torch.testing.assert_close(grads[name], grad, msg=name)
    assert _compiled_cleanly(dynamo_counters)
    # one graph for every block (parameters are graph inputs), not one per block
    split = checkpoint_layers is not None and not _checkpoint_outside_the_call()
    assert dynamo_counters["stats"]["unique_graphs"] == (2 if split else 1)
    assert compiled._compiled_call_impl is None  # the model's forward itself stays eager
    assert list(compiled.state_dict()) == list(eager.state_dict())  # no _orig_mod. prefix
    assert fused_head(compiled) is compiled.lm_head  # so the head keeps its chunked loss


def test_every_situation_of_a_run_compiles_within_the_limit_and_the_settings_stay_inside(dynamo_counters):
    """16 blocks, the first 8 checkpointed, trained and evaluated on batches with and without a
    document boundary: more situations than torch's default limit of 8 graphs per function (past
    it every block runs eager in a new situation). The raised limit and the checkpoint flag hold
    only while a block runs."""
    config = torch._dynamo.config
    before = (config.recompile_limit, config.skip_fwd_side_effects_in_bwd_under_checkpoint)
    model = _model(layers=16)
    enable_activation_checkpointing(model, 8)
    compile_blocks(model, backend="aot_eager")
    for training in (True, False):
        model.train(training)
        for packed in (True, False):
            with torch.set_grad_enabled(training):
                out = model(**_batch(packed))
            if training:
                out.loss.backward()
    assert _compiled_cleanly(dynamo_counters)
    assert dynamo_counters["stats"]["unique_graphs"] < 16  # shared, not one per block
    assert (config.recompile_limit, config.skip_fwd_side_effects_in_bwd_under_checkpoint) == before


def test_whole_model_compile_is_what_loses_the_chunked_head_loss():
    model = _model()
    model.compile(backend="eager")
    assert fused_head(model) is None


def test_a_model_without_blocks_is_refused():
    with pytest.raises(ConfigError, match="no transformer blocks"):
        compile_blocks(torch.nn.Sequential(torch.nn.Linear(4, 4)))
