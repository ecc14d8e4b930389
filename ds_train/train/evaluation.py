"""One evaluation pass over the validation batches: the loss over all of them, and one per
data.valid set when several are listed.

A mixture's single `valid_loss` hides which domain got worse (code can regress while prose
improves and the average stays flat), so, as OLMo-core and llm-foundry do, each set also gets its
own `valid_loss/<name>`. The pass is the same: the batches already carry each row's set
(`batch["source"]`, from the data plan), and the objective's `row_losses` gives each row's summed
loss from the same forward, so the per-set sums cost one `index_add` per batch and ride in the
pass's one all-reduce.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch

from ds_train.distributed.engine import all_reduce_sum
from ds_train.objectives.base import IGNORE_INDEX


@torch.no_grad()
def evaluation_record(
    model: torch.nn.Module,
    objective,
    batches: Iterable[dict],
    to_device: Callable[[dict], dict],
    device: torch.device,
    set_names: list[str] | None = None,
) -> dict:
    """valid_loss, valid_tokens and (token losses) valid_ppl, summed over ranks (collective: every rank calls it),
    plus `valid_loss/<name>` per set when `set_names` lists several and the objective gives
    `row_losses`, plus the objective's `eval_metrics` when it has an `eval_step`.

    An objective may return summable statistics per batch (e.g. a confusion matrix):
    `eval_step(model, batch) -> (loss_sum, stats)`, turned into record entries by
    `eval_metrics(stats summed over batches and ranks)`. Evaluation only; training is untouched."""
    eval_step = getattr(objective, "eval_step", None)
    per_set = (
        set_names is not None
        and len(set_names) > 1
        and eval_step is None
        and hasattr(objective, "row_losses")
    )
    # [loss, targets] overall, then [loss, targets] per set: one all-reduce for all of them
    totals = torch.zeros(1 + (len(set_names) if per_set else 0), 2, dtype=torch.float64, device=device)
    stats: torch.Tensor | None = None
    for batch in batches:
        batch = to_device(batch)
        if per_set:
            rows = objective.row_losses(model, batch).double()
            targets = (batch["labels"] != IGNORE_INDEX).reshape(rows.shape[0], -1).sum(1).double()
            totals[1:].index_add_(0, batch["source"], torch.stack([rows, targets], dim=1))
            loss_sum = rows.sum()
        elif eval_step is None:
            loss_sum = objective.loss_sum(model, batch)
        else:
            loss_sum, batch_stats = eval_step(model, batch)
            stats = batch_stats.double() if stats is None else stats + batch_stats.double()
        totals[0, 0] += loss_sum.double()
        totals[0, 1] += batch["num_targets"].double()
    all_reduce_sum(totals)
    loss = float(totals[0, 0] / totals[0, 1].clamp(min=1))
    record = {"valid_loss": loss, "valid_tokens": int(totals[0, 1])}
    if getattr(objective, "per_token", True):  # a perplexity of a per-example loss means nothing
        record["valid_ppl"] = math.exp(min(loss, 50.0))
    if per_set:
        for name, (set_loss, set_targets) in zip(set_names, totals[1:].tolist(), strict=True):
            # a set the pass did not reach (train.eval_steps cut it short) has no loss: left out
            if set_targets > 0:
                record[f"valid_loss/{name}"] = set_loss / set_targets
    if stats is not None:
        record.update(objective.eval_metrics(all_reduce_sum(stats)))
    return record
