"""Supervised fine-tuning objective: next-token loss on response tokens only.

Rows come from packing.py: `tokens`, `targets` (is this token a loss target) and `positions`
(restarting at each example). Input = row[:-1], label = row[1:] where targeted, else ignored.
The loss is pretraining's causal-LM loss on those labels, summed, with the number of response
tokens as `num_targets` (the trainer divides by the global count).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ds_train.objectives.base import IGNORE_INDEX, target_index
from ds_train.objectives.head_loss import lm_loss_sum


@dataclass
class SupervisedFineTuning:
    loss_chunk_tokens: int = 0  # > 0: the head runs on response tokens only, chunked (head_loss.py)
    z_loss: float = 0.0  # model.z_loss: PaLM's z-loss weight (head_loss.lm_loss_sum)
    train_sources: int = 0  # > 1: a data.train mixture's per-source training loss (head_loss.lm_loss_sum)
    name: str = "sft"

    def collate(self, arrays: dict[str, np.ndarray], sample_ids: np.ndarray) -> dict[str, torch.Tensor]:
        tokens = torch.from_numpy(arrays["tokens"].astype(np.int64))
        targets = torch.from_numpy(arrays["targets"].astype(bool))
        positions = torch.from_numpy(arrays["positions"].astype(np.int64))
        labels = torch.where(targets[:, 1:], tokens[:, 1:], torch.full_like(tokens[:, 1:], IGNORE_INDEX))
        batch = {
            "input_ids": tokens[:, :-1].contiguous(),
            "labels": labels.contiguous(),
            "position_ids": positions[:, :-1].contiguous(),
            "sample_ids": torch.from_numpy(np.asarray(sample_ids, dtype=np.int64)),
            "num_targets": (labels != IGNORE_INDEX).sum().to(torch.float32),
        }
        if self.loss_chunk_tokens:
            batch["target_index"] = target_index(labels)
        return batch

    def loss_sum(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        # the same forward and summed cross-entropy as causal-LM pretraining
        inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
        return lm_loss_sum(
            model, inputs, batch, self.loss_chunk_tokens, z_loss=self.z_loss, by_source=self.train_sources
        )

    def row_losses(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
        return lm_loss_sum(model, inputs, batch, self.loss_chunk_tokens, by_row=True)
