"""The training loss of each source of a data.train mixture, per log line (`loss/<name>`).

A mixture's single training loss hides which domain the model is learning and which it has
stopped learning (a data-mixing study needs each one's curve, as the per-set validation losses
give for held-out data). The objective sums each source's token losses from the same per-token
values its loss comes from (objectives/head_loss.py: `by_source`), detached, into
`batch["source_loss"]`; here they add up on the device, and ride in the log line's all-reduce of
the interval's losses (interval_record.py), which turns them into means over target tokens.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from ds_train.data.shard_set import source_names


def for_mixture(objective: Any, train_spec: Any, num_sources: int) -> tuple[Any, list[str] | None]:
    """(the objective, each source's name) for training on `train_spec` (data.train) of
    `num_sources` sources: a mixture's objective sums each source's loss (`train_sources`); a
    single source's is returned as it is, with no names."""
    if num_sources < 2:
        return objective, None
    return dataclasses.replace(objective, train_sources=num_sources), source_names(train_spec)


class SourceLosses:
    def __init__(self, names: list[str], device: torch.device):
        self.names = names
        # [loss sum, target tokens] per source; float64: an interval's token count passes 2^24
        self._sums = torch.zeros(len(names), 2, dtype=torch.float64, device=device)

    def add(self, batch: dict) -> None:
        """A micro-batch after its loss was computed (no sync)."""
        if "source_loss" in batch:
            self._sums += batch["source_loss"]

    def pending(self) -> torch.Tensor:
        """This rank's sums since the last log line, flat, for the log line's all-reduce."""
        return self._sums.reshape(-1)

    def record(self, reduced: list[float]) -> dict:
        """`loss/<name>` over the interval from the all-reduced `pending()`, for the sources it
        read, and `mix/<name>`, each one's share of the interval's target tokens: the mixture the
        weights gave. Starts the next interval."""
        self._sums.zero_()
        sums = list(zip(reduced[::2], reduced[1::2], strict=True))
        total = sum(n for _, n in sums)
        record = {f"loss/{name}": s / n for name, (s, n) in zip(self.names, sums, strict=True) if n > 0}
        if total > 0:
            record.update({f"mix/{name}": n / total for name, (_, n) in zip(self.names, sums, strict=True)})
        return record
