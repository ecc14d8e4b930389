"""Sequence classification objective: cross-entropy over class logits, one target per example.

Rows are texts padded to seq_len; each micro-batch is cut to its longest text and carries an
attention mask (BERT-style models attend in both directions, so padding must be masked). Besides
the summed loss, evaluation returns a confusion matrix per batch (`eval_step`), which the trainer
sums over batches and ranks and turns into accuracy, macro-F1 and a summary (`eval_metrics`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ds_train.finetune.metrics import classification_metrics, confusion_counts
from ds_train.objectives.base import IGNORE_INDEX


@dataclass
class SequenceClassification:
    class_names: list[str]
    name: str = "classification"
    per_token: bool = False  # one cross-entropy per example: no perplexity is reported
    class_weights: list[float] | None = None  # per class, training loss only (finetune.class_weights)

    def collate(self, arrays: dict[str, np.ndarray], sample_ids: np.ndarray) -> dict[str, torch.Tensor]:
        lengths = arrays["lengths"].astype(np.int64)
        width = max(1, int(lengths.max()))
        tokens = torch.from_numpy(arrays["tokens"][:, :width].astype(np.int64))
        mask = torch.arange(width)[None, :] < torch.from_numpy(lengths)[:, None]
        labels = torch.from_numpy(arrays["labels"].astype(np.int64))
        batch = {
            "input_ids": tokens,
            "attention_mask": mask.long(),
            "labels": labels,
            "sample_ids": torch.from_numpy(np.asarray(sample_ids, dtype=np.int64)),
            "num_targets": (labels != IGNORE_INDEX).sum().to(torch.float32),
        }
        if "segments" in arrays:  # sentence pairs (finetune.text_pair_field), BERT-style models
            batch["token_type_ids"] = torch.from_numpy(arrays["segments"][:, :width].astype(np.int64))
        return batch

    def logits(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        if "token_type_ids" in batch:
            inputs["token_type_ids"] = batch["token_type_ids"]
        return model(**inputs).logits.float()

    def loss_sum(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Summed over the batch's examples, each weighted by its class's weight (if any). The
        trainer divides by the example count: "balanced" weights average 1 over the training set,
        so this is the weighted mean in expectation, and the gradient scale stays as unweighted."""
        logits = self.logits(model, batch)
        weight = None
        if self.class_weights is not None:
            weight = torch.tensor(self.class_weights, dtype=torch.float32, device=logits.device)
        return F.cross_entropy(
            logits, batch["labels"], weight=weight, ignore_index=IGNORE_INDEX, reduction="sum"
        )

    def eval_step(
        self, model: torch.nn.Module, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed loss, flattened confusion counts) of one batch, from one forward pass."""
        logits = self.logits(model, batch)
        loss = F.cross_entropy(logits, batch["labels"], ignore_index=IGNORE_INDEX, reduction="sum")
        counts = confusion_counts(logits.argmax(-1), batch["labels"], len(self.class_names))
        return loss, counts.to(loss.device)

    def eval_metrics(self, stats: torch.Tensor) -> dict:
        """Metrics record entries from the confusion counts summed over batches and ranks."""
        k = len(self.class_names)
        m = classification_metrics(stats.detach().cpu().numpy().reshape(k, k), self.class_names)
        return {
            "valid_accuracy": m["accuracy"],
            "valid_macro_f1": m["macro_f1"],
            "valid_examples": m["examples"],
            "valid_confusion": m["confusion"],
            "valid_top_confusions": m["top_confusions"],
            "valid_per_class": m["per_class"],
        }


def class_weights(setting, class_names: list[str], train_counts: dict[str, int]) -> list[float] | None:
    """finetune.class_weights as one weight per class (None: unweighted). "balanced" is
    scikit-learn's: n / (k × count_c) over the train split's n examples of k classes; a class
    without train examples gets weight 0 (it contributes no training loss either way)."""
    if setting == "none":
        return None
    if isinstance(setting, list):
        return [float(w) for w in setting]
    counts = [int(train_counts.get(name, 0)) for name in class_names]
    n, k = sum(counts), len(class_names)
    return [n / (k * c) if c else 0.0 for c in counts]
