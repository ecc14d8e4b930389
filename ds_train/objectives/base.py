"""The objective interface shared by pretraining and fine-tuning.

An objective turns packed rows `[n, seq_len + 1]` (plus their global sample ids) into a batch in
the DataLoader workers, and computes the *summed* loss and the number of target tokens in the
training process. Summing, not averaging, lets the trainer divide by the token count of the whole
global batch, so every token weighs the same whatever the micro-batch, accumulation or world size.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


class Objective(Protocol):
    name: str

    def collate(self, rows: np.ndarray, sample_ids: np.ndarray) -> dict[str, torch.Tensor]:
        """Batch for the model from packed rows; runs in DataLoader workers, must be deterministic."""

    def loss_sum(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Sum of token losses over the batch's targets (fp32 scalar)."""

    # Optional, evaluation only: `row_losses(model, batch) -> [rows]`, each row's summed token
    # loss, for one validation loss per data.valid set (`Trainer.evaluate`).


def summed_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]),
        labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


def row_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each row's summed token loss, `[rows]` fp32 (per-set validation losses)."""
    losses = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]),
        labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    )
    return losses.reshape(labels.shape[0], -1).sum(1)


def target_index(labels: torch.Tensor) -> torch.Tensor:
    """Flat indices of the target positions, for the chunked head loss (computed by `collate`, on
    the CPU, so selecting the targets costs the GPU no host sync)."""
    return (labels.reshape(-1) != IGNORE_INDEX).nonzero().squeeze(1)


def ignore_rows(batch: dict[str, torch.Tensor], rows: torch.Tensor) -> None:
    """Take the given rows' targets out of a collated batch (a lost or padding row), and keep the
    fields derived from the labels in step."""
    batch["labels"][rows] = IGNORE_INDEX
    batch["num_targets"] = (batch["labels"] != IGNORE_INDEX).sum().to(torch.float32)
    if "target_index" in batch:
        batch["target_index"] = target_index(batch["labels"])


def document_position_ids(tokens: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Positions restarting after each EOS in a packed row: [a a EOS b b] → [0 1 2 0 1].

    With position ids like these and no attention mask, transformers builds a block-diagonal
    causal mask (packed-sequence detection), so documents do not attend to each other.
    """
    n, t = tokens.shape
    idx = torch.arange(t).expand(n, t)
    starts = torch.zeros_like(tokens, dtype=torch.bool)
    starts[:, 1:] = tokens[:, :-1] == eos_id
    start_idx = torch.where(starts, idx, torch.zeros_like(idx))
    return idx - torch.cummax(start_idx, dim=1).values


def build_objective(
    name: str,
    *,
    tokenizer,
    seed: int,
    document_masking: bool,
    mlm_probability: float = 0.15,
    loss_chunk_tokens: int = 0,
    z_loss: float = 0.0,
) -> Objective:
    from ds_train.objectives.causal_lm import CausalLM
    from ds_train.objectives.masked_lm import MaskedLM

    if name == "causal_lm":
        eos = tokenizer.eos_token_id if document_masking else None
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id != tokenizer.eos_token_id else None
        return CausalLM(eos_id=eos, pad_id=pad, loss_chunk_tokens=loss_chunk_tokens, z_loss=z_loss)
    if name == "masked_lm":
        return MaskedLM.from_tokenizer(
            tokenizer,
            seed=seed,
            probability=mlm_probability,
            loss_chunk_tokens=loss_chunk_tokens,
            z_loss=z_loss,
        )
    raise ValueError(f"unknown objective {name}")
