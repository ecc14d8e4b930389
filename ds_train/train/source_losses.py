"""The training loss of each source of a data.train mixture, per log line (`loss/<name>`).

A mixture's single training loss hides which domain the model is learning and which it has
stopped learning (a data-mixing study needs each one's curve, as the per-set validation losses
give for held-out data). The objective sums each source's token losses from the same per-token
values its loss comes from (objectives/head_loss.py: `by_source`), detached, into
`batch["source_loss"]`; here they add up on the device, and one all-reduce at the log line
turns them into means over the interval's target tokens.
"""

from __future__ import annotations

import torch

from ds_train.distributed.engine import all_reduce_sum


class SourceLosses:
    def __init__(self, names: list[str], device: torch.device):
        self.names = names
        self._sums = torch.zeros(len(names), 2, device=device)  # [loss sum, target tokens] per source

    def add(self, batch: dict) -> None:
        """A micro-batch after its loss was computed (no sync)."""
        if "source_loss" in batch:
            self._sums += batch["source_loss"]

    def take(self) -> dict:
        """`loss/<name>` over the interval, for the sources it read, and `mix/<name>`, each one's
        share of the interval's target tokens: the mixture the weights gave (collective: every
        rank calls it)."""
        sums = all_reduce_sum(self._sums.double()).tolist()
        self._sums.zero_()
        total = sum(n for _, n in sums)
        record = {f"loss/{name}": s / n for name, (s, n) in zip(self.names, sums, strict=True) if n > 0}
        if total > 0:
            record.update({f"mix/{name}": n / total for name, (_, n) in zip(self.names, sums, strict=True)})
        return record
