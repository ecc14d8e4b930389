"""Micro-batches of a tokenized fine-tuning split, with pretraining's global-step semantics.

Training: the stream position p of global batch b, rank r, micro-batch m is
`data.loader.rank_positions` (the same slice pretraining takes); `SampleOrder` over one "shard"
holding every row maps it to a row, shuffled per epoch from (seed, epoch). So the order is a pure
function of (seed, data), resume needs only the step, and any world size with the same global
batch sees the same global batches.

Evaluation covers the split exactly once: positions run over ceil(rows / global batch) global
batches in row order, and positions past the end are padding whose targets are dropped, so every
rank runs the same number of forward passes (ZeRO-3 needs that) and metrics count each example once.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch.utils.data import Dataset

from ds_train.data.loader import rank_positions
from ds_train.data.order import SampleOrder
from ds_train.data.stream_origin import FRESH, StreamOrigin
from ds_train.distributed.deepspeed_config import BatchLayout
from ds_train.finetune.dataset import ExampleSet
from ds_train.objectives.base import ignore_rows

Collate = Callable[[dict[str, np.ndarray], np.ndarray], dict[str, torch.Tensor]]


class ExampleBatches(Dataset):
    """Item k is the k-th micro-batch this rank consumes from `start_step` on."""

    def __init__(
        self,
        examples: ExampleSet,
        layout: BatchLayout,
        rank: int,
        collate: Collate,
        *,
        seed: int,
        start_step: int = 0,
        evaluation: bool = False,
        shuffle: bool = True,
        origin: StreamOrigin = FRESH,
    ):
        self.examples, self.layout, self.rank, self.collate = examples, layout, rank, collate
        self.start_step, self.evaluation, self.origin = start_step, evaluation, origin
        # One shard of all rows; window 1 = a full permutation of the rows per epoch (data.shuffle;
        # false: the file's order, every epoch).
        self.order = SampleOrder(
            np.asarray([examples.num_rows]), seed, shuffle=shuffle and not evaluation, window=1
        )

    def eval_micro_batches(self) -> int:
        """Micro-batches per rank that cover the split once."""
        return math.ceil(self.examples.num_rows / self.layout.global_batch_size) * self.layout.grad_accum

    def __getitem__(self, k: int) -> dict:
        step = self.start_step + k // self.layout.grad_accum
        positions = rank_positions(step, k % self.layout.grad_accum, self.layout, self.rank, self.origin)
        n = self.examples.num_rows
        if self.evaluation:
            keep = positions < n
            rows = np.where(keep, positions, positions % n)
        else:
            keep = None
            _, rows = self.order.locate(positions)
        batch = self.collate(self.examples.read(rows), positions)
        if keep is not None and not keep.all():  # the last eval batch's padding rows
            ignore_rows(batch, torch.from_numpy(~keep))
        batch["step"] = torch.tensor(step)
        batch["source"] = torch.zeros(len(rows), dtype=torch.int64)
        batch["shard"] = torch.zeros(len(rows), dtype=torch.int64)
        batch["row"] = torch.from_numpy(np.asarray(rows, dtype=np.int64))
        return batch
