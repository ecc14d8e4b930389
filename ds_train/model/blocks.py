"""What ds_train does to a model per transformer block: activation checkpointing and compilation.

Both act on the same units, the model's repeated blocks (transformers' `GradientCheckpointingLayer`
subclasses: LlamaDecoderLayer, GPT2Block, BertLayer, ...), and both are applied right after the
model is built, checkpointing first (a checkpointed block is compiled checkpoint and all; see
`_dynamo_settings` for how that differs between transformers releases).
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


def check_checkpointing_layers(layers: int, hf_config) -> None:
    """Refuse more checkpointed blocks than the config has, before any model or process group
    exists (`--check` included); `enable_activation_checkpointing` checks the built model too, for
    architectures whose blocks are not one per `num_hidden_layers`."""
    blocks = getattr(hf_config, "num_hidden_layers", None)
    if layers and isinstance(blocks, int) and layers > blocks:
        raise ConfigError(
            f"model.activation_checkpointing_layers={layers} but the model config has "
            f"{blocks} layers (num_hidden_layers)"
        )


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


# Graphs one block function may compile before dynamo gives up and runs it eager (torch's default
# is 8). Every block of every class runs through one function in recent transformers, and each
# situation compiles its own graph: train/eval × mask/no mask × checkpointed/plain blocks
# (checkpointing also makes the first block's input require grad in eval) made 10 on a 16-block
# Llama with its first 8 checkpointed (tests/unit/test_compile_blocks.py), and some architectures
# need one graph per layer (GPT-2 with scale_attn_by_inverse_layer_idx) or two per situation
# (sliding-window attention).
RECOMPILE_LIMIT = 64


def compile_blocks(model: torch.nn.Module, backend: str = "inductor") -> int:
    """`torch.compile` each transformer block in place (`Module.compile`), as torchtitan does,
    instead of the whole model (DeepSpeed's `engine.compile()`). Returns the number of blocks.

    - Compile time does not grow with depth: blocks of one class usually share their graphs
      (dynamo lifts module parameters to graph inputs), so 16 Llama blocks cost one block's compile.
    - The model's own forward stays eager: the output head keeps its chunked loss
      (ds_train/objectives/head_loss.py), which a compiled whole model cannot swap in.
    - In place: parameter and state-dict names are unchanged (no `_orig_mod.` prefix), so
      checkpoints, resumption and `ds-train convert` see the same model.
    - Dynamo settings the blocks need (`_dynamo_settings`) apply while a block runs, not to the
      rest of the process."""
    blocks = transformer_blocks(model)
    if not blocks:
        raise ConfigError(
            f"model.compile: {type(model).__name__} has no transformer blocks ds_train can find "
            "(transformers' GradientCheckpointingLayer): set model.compile=false"
        )
    settings = torch._dynamo.config.patch(**_dynamo_settings())
    for block in blocks:
        block.compile(backend=backend)
        # the settings must hold when dynamo traces, which happens inside a call, at the first one
        # and at each recompile: they wrap the compiled call Module.compile installed (a private
        # attribute nn.Module calls instead of _call_impl; checked, so a rename cannot go unseen)
        compiled = getattr(block, "_compiled_call_impl", None)
        if compiled is None:
            raise RuntimeError(f"torch {torch.__version__}: Module.compile left no _compiled_call_impl")
        block._compiled_call_impl = settings(compiled)
    log.info(
        "model.compile: %d blocks compiled with torch.compile; the first step compiles them", len(blocks)
    )
    return len(blocks)


def _dynamo_settings() -> dict:
    """- A recompile limit that fits the situations a run meets (RECOMPILE_LIMIT).
    - Checkpointed blocks compiled whole. transformers 5.25 checkpoints inside the block's
      `forward` (5.17, in `__call__`, outside the compiled call), so dynamo traces the checkpoint,
      and it refuses one whose forward mutates Python state: the `kernels` package's
      `use_kernelized_func` wrapper on the attention sets and resets a context variable there, so
      each checkpointed block fell back to eager (a graph break, no error). The flag skips
      replaying such mutations in the backward's recompute: that set/reset pair cancels out, and
      transformers' output-capturing hooks only append when hidden states or attentions are
      collected, which training never asks for. Hooks that must run (DeepSpeed's, ds_train's
      own) are kept out of graphs (`torch.compiler.disable`), so they are never skipped.
    Names differ between torch releases; those this one lacks are left out."""
    config = torch._dynamo.config
    wanted = {
        "recompile_limit": RECOMPILE_LIMIT,
        "cache_size_limit": RECOMPILE_LIMIT,  # the same limit's name before torch 2.6
        "skip_fwd_side_effects_in_bwd_under_checkpoint": True,
    }
    names = [n for n in wanted if hasattr(config, n)]
    if "recompile_limit" in names and "cache_size_limit" in names:
        names.remove("cache_size_limit")  # an alias of recompile_limit: set one of the two
    return {n: wanted[n] for n in names}
