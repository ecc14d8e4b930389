"""Next-token prediction on packed rows: input = row[:-1], target = row[1:]."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ds_train.objectives.base import IGNORE_INDEX, document_position_ids, target_index
from ds_train.objectives.head_loss import lm_loss_sum


@dataclass
class CausalLM:
    eos_id: int | None  # None: no document masking, positions run 0..T-1 over the whole row
    pad_id: int | None = None  # padding of a shard set's last row: never a target
    loss_chunk_tokens: int = 0  # > 0: the chunked, target-only head loss (head_loss.py)
    z_loss: float = 0.0  # model.z_loss: PaLM's z-loss weight (head_loss.lm_loss_sum)
    train_sources: int = 0  # > 1: a mixture's per-source training loss (head_loss.lm_loss_sum's by_source)
    name: str = "causal_lm"

    def collate(self, rows: np.ndarray, sample_ids: np.ndarray) -> dict[str, torch.Tensor]:
        tokens = torch.from_numpy(rows.astype(np.int64, copy=False))
        batch = {
            "input_ids": tokens[:, :-1].contiguous(),
            "labels": tokens[:, 1:].contiguous(),
            "sample_ids": torch.from_numpy(np.asarray(sample_ids, dtype=np.int64)),
        }
        if self.eos_id is not None:
            batch["position_ids"] = document_position_ids(batch["input_ids"], self.eos_id)
        if self.pad_id is not None:
            batch["labels"][batch["labels"] == self.pad_id] = IGNORE_INDEX
        batch["num_targets"] = (batch["labels"] != IGNORE_INDEX).sum().to(torch.float32)
        if self.loss_chunk_tokens:
            batch["target_index"] = target_index(batch["labels"])
        return batch

    def loss_sum(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return lm_loss_sum(
            model,
            _inputs(batch),
            batch,
            self.loss_chunk_tokens,
            z_loss=self.z_loss,
            by_source=self.train_sources,
        )

    def row_losses(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return lm_loss_sum(model, _inputs(batch), batch, self.loss_chunk_tokens, by_row=True)


def _inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | None]:
    return {"input_ids": batch["input_ids"], "position_ids": batch.get("position_ids")}
