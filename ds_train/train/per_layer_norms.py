"""Per-layer gradient and weight norms every `train.per_layer_norms_every` steps.

A loss spike or a slow divergence usually starts in a few layers (the embeddings, the last
blocks, one attention projection): the global gradient norm says that something moved, these say
where. Megatron logs a parameter norm and OLMo-core per-parameter gradient norms; here each
transformer block is one group (every parameter under `...layers.<i>.`), and every other module
(embeddings, final norm, head) is its own group.

The norms are those of the step's reduced gradients (before clipping) and of the fp32 master
weights before the update. Each rank sums the squares of the pieces it holds
(distributed/param_shards.py), and one all-reduce of a 2 × groups vector adds them up. There is
no gather of full gradients; on a GPU, one device sync per measurement (offloaded gradients land
in host memory asynchronously), and none at the steps in between.
"""

from __future__ import annotations

from typing import Any

import torch

from ds_train.distributed.engine import all_reduce_sum
from ds_train.distributed.param_shards import local_pieces, loss_scale

PEFT_PREFIX = "base_model.model."  # peft wraps the model: its names start with this


def layer_group(name: str) -> str:
    """The group of parameter `name`: the module path up to the first block index
    (`model.layers.3`), else the module holding it (`model.embed_tokens`, `lm_head`)."""
    parts = name.removeprefix(PEFT_PREFIX).split(".")
    for i, part in enumerate(parts[:-1]):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return ".".join(parts[:-1]) or parts[0]


class PerLayerNorms:
    """Measures at the steps (as logged: 1 is the first) that are multiples of `every`."""

    def __init__(self, every: int, model: torch.nn.Module, rank: int, device: torch.device):
        self.every, self.rank, self.device = every, rank, device
        self.groups: list[str] = []
        self.params: list[torch.nn.Parameter] = []
        group_of: list[int] = []
        for name, param in model.named_parameters():
            if not param.requires_grad:  # frozen (LoRA's base model): no gradient, no update
                continue
            group = layer_group(name)
            if group not in self.groups:
                self.groups.append(group)
            self.params.append(param)
            group_of.append(self.groups.index(group))
        self._group_of = torch.tensor(group_of, dtype=torch.long, device=device)
        self._measured: torch.Tensor | None = None  # squares summed over ranks, until logged

    def due(self, step: int) -> bool:
        return step % self.every == 0

    def measure(self, engine: Any) -> None:
        """Call after the step's last backward, before its engine.step()."""
        if self.device.type == "cuda":
            # With optimizer offload, ZeRO-1/2 copy the reduced gradients to pinned host memory
            # without blocking and wait for the copies only inside step(): read them after they land
            # (a sync every `every` steps, none in between)
            torch.cuda.synchronize(self.device)
        squares = torch.zeros(2, len(self.params), device=self.device)
        for k, param in enumerate(self.params):
            grad, weight = local_pieces(param, self.rank)
            if grad is not None:
                squares[0, k] = torch.linalg.vector_norm(grad, dtype=torch.float32).to(self.device) ** 2
            if weight is not None:
                squares[1, k] = torch.linalg.vector_norm(weight, dtype=torch.float32).to(self.device) ** 2
        squares[0] /= loss_scale(engine) ** 2
        per_group = torch.zeros(2, len(self.groups), device=self.device)
        per_group.index_add_(1, self._group_of, squares)
        self._measured = all_reduce_sum(per_group)

    def take(self) -> dict:
        """The last measurement as log-record fields (empty if none since the last call)."""
        if self._measured is None:
            return {}
        grad, weight = self._measured.sqrt().tolist()
        self._measured = None
        return {
            "layer_grad_norm": dict(zip(self.groups, grad)),
            "layer_weight_norm": dict(zip(self.groups, weight)),
        }
