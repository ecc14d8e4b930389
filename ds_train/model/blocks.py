"""What ds_train does to a model per transformer block: activation checkpointing and compilation.

Both act on the same units, the model's repeated blocks (transformers' `GradientCheckpointingLayer`
subclasses: LlamaDecoderLayer, GPT2Block, BertLayer, ...), and both are applied right after the
model is built, checkpointing first: a block's checkpoint wraps its (compiled) call.
"""

from __future__ import annotations

import logging

import torch

from ds_train.config.loader import ConfigError
from ds_train.config.schema import ModelSection

log = logging.getLogger(__name__)


def apply_block_options(model: torch.nn.Module, section: ModelSection) -> None:
    """The `model.*` options that act per block, in the order they must be applied."""
    if section.activation_checkpointing:
        enable_activation_checkpointing(model, section.activation_checkpointing_layers)
    if section.compile:
        compile_blocks(model)


def transformer_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's transformer blocks, in module order (the forward's order)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def enable_activation_checkpointing(model: torch.nn.Module, layers: int = 0) -> None:
    """Recompute the activations of the first `layers` transformer blocks (0: all) in the backward
    (non-reentrant: works with ZeRO-3 and frozen inputs).

    The first blocks rather than every n-th (transformers' `every_n_layers`, which not every
    release has): the backward reaches them last, when the later blocks have freed what they kept,
    so their recomputation does not add to the peak (ds_train/plan/memory_estimate.py). transformers
    5.x renamed the enabling method and deprecated the old name; older releases only have the old one."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if not layers:
        return
    blocks = transformer_blocks(model)
    if layers > len(blocks):
        raise ConfigError(
            f"model.activation_checkpointing_layers={layers} but {type(model).__name__} has "
            f"{len(blocks)} checkpointable blocks"
            + ("" if blocks else " (this architecture checkpoints all its layers or none: set it to 0)")
        )
    for index, block in enumerate(blocks):  # in module order: the first blocks of the forward
        block.gradient_checkpointing = index < layers


def compile_blocks(model: torch.nn.Module, backend: str = "inductor") -> int:
    """`torch.compile` each transformer block in place (`Module.compile`), as torchtitan does,
    instead of the whole model (DeepSpeed's `engine.compile()`). Returns the number of blocks.

    - Compile time does not grow with depth: blocks of one class share one graph (dynamo lifts
      module parameters to graph inputs), so 16 blocks cost one block's compile.
    - The model's own forward stays eager: the output head keeps its chunked loss
      (ds_train/objectives/head_loss.py), which a compiled whole model cannot swap in.
    - In place: parameter and state-dict names are unchanged (no `_orig_mod.` prefix), so
      checkpoints, resumption and `ds-train convert` see the same model.
    - A checkpointed block is compiled with its checkpoint (see `_trace_through_checkpoints`).
    Under ZeRO-3, DeepSpeed's parameter fetches run as hooks on every layer and are kept out of
    the graph, so each block breaks into per-layer pieces and little is fused."""
    blocks = transformer_blocks(model)
    if not blocks:
        raise ConfigError(
            f"model.compile: {type(model).__name__} has no transformer blocks ds_train can find "
            "(transformers' GradientCheckpointingLayer): set model.compile=false"
        )
    if any(getattr(b, "gradient_checkpointing", False) for b in blocks):
        _trace_through_checkpoints()
    for block in blocks:
        block.compile(backend=backend)
    log.info(
        "model.compile: %d blocks compiled with torch.compile; the first step compiles them", len(blocks)
    )
    return len(blocks)


def _trace_through_checkpoints() -> None:
    """Let dynamo compile a checkpointed block whole. transformers ≥ 5.2x checkpoints inside the
    block's `forward`, so the checkpoint is traced with it, and dynamo refuses a checkpoint whose
    forward mutates Python state: transformers' output-capturing hooks read a context variable
    there, so each checkpointed block fell back to eager (a graph break, no error). What the flag
    skips is replaying that mutation in the recompute, where it does nothing in training (no
    hidden states or attentions are collected). It is torch's process-wide dynamo setting, set
    only when a run compiles checkpointed blocks; releases without it leave those blocks eager."""
    config = torch._dynamo.config
    if hasattr(config, "skip_fwd_side_effects_in_bwd_under_checkpoint"):
        config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
