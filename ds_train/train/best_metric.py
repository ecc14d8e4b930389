"""Which evaluation was best, for early stopping and for keeping that checkpoint.

`train.best_metric` names a figure of the evaluation record (`valid_loss`, `valid_accuracy`,
`valid_macro_f1`, a `valid_loss/<set>`...); losses and perplexities are better lower, anything
else higher. Every rank holds one of these and updates it with the same all-reduced record, so
every rank reaches the same decision without another collective. Its state rides in each
checkpoint's ds_train_state.json, so a resumed run keeps counting where the interrupted one was
(the transformers Trainer keeps the same in trainer_state.json).
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger(__name__)


def lower_is_better(metric: str) -> bool:
    """Losses and perplexities; judged by the figure's own name, the part before any `/<set>`
    (`valid_loss/code`), so a set or task named `apple_qa` (ppl) or `glossary` (loss) cannot turn
    an accuracy around. data.downstream's figures are accuracies."""
    head = metric.lower().split("/", 1)[0]
    return head != "downstream" and ("loss" in head or "ppl" in head or "perplexity" in head)


@dataclass
class BestMetric:
    metric: str = "valid_loss"
    best: float | None = None
    best_step: int | None = None
    evals_since_best: int = 0  # evaluations since the best one (0: the last one was the best)
    missing_warned: bool = False

    def update(self, record: dict, step: int) -> bool:
        """Take one evaluation record; True when it is the best so far."""
        value = record.get(self.metric)
        if isinstance(value, (int, float)) and math.isnan(value):  # a diverged run: no improvement
            log.warning("%s is NaN at step %d: counted as no improvement", self.metric, step)
            self.evals_since_best += self.best is not None
            return False
        if not isinstance(value, (int, float)):
            if not self.missing_warned:
                log.warning(
                    "train.best_metric=%s is not in the evaluation record (it has %s): no best "
                    "checkpoint and no early stopping",
                    self.metric,
                    ", ".join(k for k in record if k.startswith("valid_")),
                )
                self.missing_warned = True
            return False
        better = self.best is None or (
            value < self.best if lower_is_better(self.metric) else value > self.best
        )
        if better:
            self.best, self.best_step, self.evals_since_best = float(value), step, 0
        else:
            self.evals_since_best += 1
        return better

    def exhausted(self, patience: int) -> bool:
        """True once `patience` evaluations in a row brought nothing better (patience 0: never)."""
        return patience > 0 and self.best is not None and self.evals_since_best >= patience

    def stop_message(self, step: int) -> str:
        return (
            f"early stopping at step {step}: {self.metric} has not improved for {self.evals_since_best} "
            f"evaluations (best {self.best:.6g} at step {self.best_step}); ending as at train.max_steps"
        )

    def summary(self, checkpoint: Path) -> str:
        """The end-of-run line: the best value, its step, and its checkpoint if it was kept."""
        where = f"; its checkpoint: {checkpoint}" if checkpoint.is_dir() else ""
        return f"best {self.metric}: {self.best:.6g} at step {self.best_step}{where}"

    def state(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "missing_warned"}

    @classmethod
    def from_state(cls, metric: str, state: dict | None) -> BestMetric:
        """A resumed run's record of its best evaluation; a fresh one if the metric changed."""
        if not state or state.get("metric") != metric:
            return cls(metric)
        return cls(metric, state.get("best"), state.get("best_step"), int(state.get("evals_since_best", 0)))


def evaluation_figures(cfg, task: str | None) -> set[str]:
    """The figures this run's evaluation records will hold (`task`: the fine-tuning task, None
    when pretraining), for checking train.best_metric before the run rather than at its first
    evaluation."""
    from ds_train.data.shard_set import DataError, source_names

    figures = {"valid_loss", "valid_tokens"}
    if task == "classification":
        figures |= {"valid_accuracy", "valid_macro_f1", "valid_examples"}
    else:  # token losses
        figures.add("valid_ppl")
    try:
        names = source_names(cfg.data.valid) if cfg.data.valid else []
    except DataError:
        names = []  # refused with its own message where the sets are read
    if len(names) > 1 and task in (None, "sft"):  # shard sets: pretraining's and SFT's
        figures |= {f"valid_loss/{n}" for n in names}
    if task is None and not cfg.data.valid:  # pretraining without validation shards: no loss
        figures = set()
    if task is None and isinstance(cfg.data.downstream, list):  # multiple-choice tasks (train/downstream.py)
        from ds_train.train.downstream import PREFIX, task_name

        figures |= {f"{PREFIX}/{task_name(p)}/{m}" for p in cfg.data.downstream for m in ("acc", "acc_norm")}
    return figures


def check_best_settings(cfg, has_validation: bool, task: str | None = None) -> None:
    """ConfigError (one line) for best-evaluation settings that could never act."""
    from ds_train.config import ConfigError

    t = cfg.train
    wanted = [
        k
        for k, on in (("early_stopping_patience", t.early_stopping_patience), ("keep_best", t.keep_best))
        if on
    ]
    if not wanted:
        return
    names = " and ".join(f"train.{k}" for k in wanted)
    if not has_validation:
        raise ConfigError(
            f"{names} need validation data (data.valid or data.downstream, or finetune.valid_file / valid_fraction)"
        )
    if not t.eval_every:
        raise ConfigError(f"{names} need evaluations during the run: set train.eval_every")
    figures = evaluation_figures(cfg, task)
    if t.best_metric not in figures:
        from ds_train.config.loader import suggest

        raise ConfigError(
            f"train.best_metric={t.best_metric} is not a figure of this run's evaluations"
            f"{suggest(t.best_metric, sorted(figures))}; they give {', '.join(sorted(figures))}"
        )
    if t.keep_best and (not t.save_every or t.eval_every % t.save_every):
        raise ConfigError(
            f"train.keep_best keeps the checkpoint of the best evaluation: make train.eval_every "
            f"({t.eval_every}) a multiple of train.save_every ({t.save_every}) so every evaluation has one"
        )
