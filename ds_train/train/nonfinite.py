"""What the training loop does with a non-finite loss: name where it came from, then skip or stop.

The trainer learns of it a step late, from the flag in the step's one all-reduce, so the check
needs no wait on a loss value; DeepSpeed's ZeRO optimizers have already discarded that step's
update because its gradient norm was not finite.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch

from ds_train.checkpoint.layout import latest_checkpoint
from ds_train.errors import RunFailure

log = logging.getLogger(__name__)


class NonFiniteLossError(RunFailure):
    """train.nonfinite=stop, or too many consecutive non-finite steps under skip."""

    every_rank = True  # the non-finite flags are all-reduced: every rank stops at the same step


class NonFiniteLosses:
    """Counts non-finite steps and applies train.nonfinite ("stop" or "skip") and max_nonfinite."""

    def __init__(
        self,
        policy: str,
        max_consecutive: int,
        rank: int,
        is_main: bool,
        describe_sample: Callable[[int, int, int], str],
        checkpoints_root: Path,
    ):
        self.policy, self.max_consecutive = policy, max_consecutive
        self.rank, self.is_main = rank, is_main
        self.describe_sample, self.checkpoints_root = describe_sample, checkpoints_root
        self.steps = 0  # non-finite steps so far (metrics.jsonl `nonfinite_steps`)
        self.consecutive = 0

    def finite(self) -> None:
        self.consecutive = 0

    def seen(self, step: int, micro: list[dict], losses: torch.Tensor) -> None:
        """Step `step` was not finite on some rank: name it and, on the rank(s) that saw it, the
        micro-batch's samples (shard and row), so the data can be found; then skip (count) or stop."""
        self.steps += 1
        self.consecutive += 1
        bad = [k for k, ok in enumerate(torch.isfinite(losses).tolist()) if not ok]
        if bad:
            b = micro[bad[0]]
            ids = b["sample_ids"].tolist() if "sample_ids" in b else []
            places = [
                self.describe_sample(int(src), int(shard), int(row))
                for src, shard, row in zip(b["source"].tolist(), b["shard"].tolist(), b["row"].tolist())
            ]
            shown = ", ".join(places[:4]) + (f", … ({len(places)} samples)" if len(places) > 4 else "")
            span = f"global samples {ids[0]}..{ids[-1]}: " if ids else ""
            where = f"on rank {self.rank}, micro-batch {bad[0]} ({span}{shown})"
        else:
            where = "on another rank (its log names the samples)"
        message = f"non-finite loss in step {step} {where}"
        if self.policy == "stop" or self.consecutive >= self.max_consecutive:
            reason = (
                "train.nonfinite=stop"
                if self.policy == "stop"
                else f"{self.consecutive} consecutive non-finite steps (train.max_nonfinite)"
            )
            latest = latest_checkpoint(self.checkpoints_root)
            kept = f"{latest.tag} is intact" if latest else "no checkpoint was written"
            raise NonFiniteLossError(f"{message}; stopping: {reason}; {kept}")
        if bad or self.is_main:
            log.warning(
                "%s; update skipped (train.nonfinite=skip; %d non-finite steps so far)", message, self.steps
            )
