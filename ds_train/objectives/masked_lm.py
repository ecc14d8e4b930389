"""BERT-style masked LM: 15% of (non-special) tokens are targets; of those 80% become [MASK],
10% a random token, 10% stay. The choice is drawn from a generator seeded by (run seed, global
sample id), so the masks do not depend on the rank, worker or resume point."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ds_train.config.loader import ConfigError
from ds_train.objectives.base import IGNORE_INDEX, target_index
from ds_train.objectives.head_loss import lm_loss_sum


def require_mask_token(tokenizer, setting: str) -> None:
    """The one check that a tokenizer can mask (pretraining's and finetuning's preflights call it,
    so --check refuses what the start would); `setting` names what asked for masking."""
    if tokenizer.mask_token_id is None:
        raise ConfigError(f"{setting} needs a tokenizer with a mask token (e.g. [MASK])")


@dataclass
class MaskedLM:
    mask_id: int
    vocab_size: int
    special_ids: tuple[int, ...]
    seed: int
    probability: float = 0.15
    loss_chunk_tokens: int = 0  # > 0: the head runs on the masked tokens only, chunked (head_loss.py)
    z_loss: float = 0.0  # model.z_loss: PaLM's z-loss weight (head_loss.lm_loss_sum)
    train_sources: int = 0  # > 1: a mixture's per-source training loss (head_loss.lm_loss_sum's by_source)
    name: str = "masked_lm"

    @classmethod
    def from_tokenizer(
        cls, tokenizer, *, seed: int, probability: float, loss_chunk_tokens: int = 0, z_loss: float = 0.0
    ) -> MaskedLM:
        require_mask_token(tokenizer, "model.objective=masked_lm")
        return cls(
            mask_id=tokenizer.mask_token_id,
            vocab_size=len(tokenizer),
            special_ids=tuple(tokenizer.all_special_ids),
            seed=seed,
            probability=probability,
            loss_chunk_tokens=loss_chunk_tokens,
            z_loss=z_loss,
        )

    def collate(self, rows: np.ndarray, sample_ids: np.ndarray) -> dict[str, torch.Tensor]:
        tokens = rows[:, :-1].astype(np.int64)
        inputs = tokens.copy()
        labels = np.full_like(tokens, IGNORE_INDEX)
        special = np.isin(tokens, self.special_ids)
        for i, sid in enumerate(np.asarray(sample_ids, dtype=np.int64)):
            rng = np.random.default_rng([self.seed, int(sid)])
            u = rng.random(tokens.shape[1])
            chosen = (u < self.probability) & ~special[i]
            action = rng.random(tokens.shape[1])
            random_tokens = rng.integers(0, self.vocab_size, tokens.shape[1])
            labels[i, chosen] = tokens[i, chosen]
            inputs[i, chosen & (action < 0.8)] = self.mask_id
            swap = chosen & (action >= 0.8) & (action < 0.9)
            inputs[i, swap] = random_tokens[swap]
        batch = {
            "input_ids": torch.from_numpy(inputs),
            "labels": torch.from_numpy(labels),
            "sample_ids": torch.from_numpy(np.asarray(sample_ids, dtype=np.int64)),
            "num_targets": torch.tensor(float((labels != IGNORE_INDEX).sum()), dtype=torch.float32),
        }
        if self.loss_chunk_tokens:
            batch["target_index"] = target_index(batch["labels"])
        return batch

    def loss_sum(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return lm_loss_sum(
            model,
            {"input_ids": batch["input_ids"]},
            batch,
            self.loss_chunk_tokens,
            z_loss=self.z_loss,
            by_source=self.train_sources,
        )

    def row_losses(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = {"input_ids": batch["input_ids"]}
        return lm_loss_sum(model, inputs, batch, self.loss_chunk_tokens, by_row=True)
