"""In-loop downstream evaluation: multiple-choice tasks scored by log-likelihood, at each evaluation.

A validation loss says the model fits the data better; whether it answers better is another
question, which OLMo-core (in-loop evaluators) and llm-foundry (ICL tasks) answer during the run.
`data.downstream` lists JSON-lines files, one question a line:

    {"context": "The cat sat on the", "choices": ["mat", "moon"], "label": 0}

Each choice is scored as lm-evaluation-harness's multiple-choice tasks score it: the summed
log-probability of the choice's tokens after the context and lm-eval's default target delimiter
(one space), the pair tokenized whole and split where the context's tokens end (so a tokenizer
that merges across the boundary scores the choice's own tokens), an empty context replaced by
the prefix token (BOS, else EOS). The answer is the choice scored highest (`acc`), or highest per
character of the choice (`acc_norm`, lm-eval's length normalisation). Checked against lm_eval
0.4.13 row by row (bench/downstream_vs_lm_eval.py). One difference, on purpose: each row starts
as the training documents do (the shards' BOS, where they have one), where lm-eval's HFLM adds
no BOS by default. A context too long for `seq_len` keeps its end, as lm-eval's does.

Every rank holds the tokenized questions (evaluation sets are small: thousands of lines) and
scores its slice of each global batch; one all-reduce gathers the scores. Under ZeRO-3 every rank
must run the same forwards, so the last batch is padded with rows that count for nothing.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from ds_train.config import ConfigError
from ds_train.data.document_framing import document_separator
from ds_train.distributed.engine import all_reduce_sum
from ds_train.objectives.base import IGNORE_INDEX, target_index

if TYPE_CHECKING:
    from ds_train.config.schema import DataSection
    from ds_train.distributed.engine import DistributedContext
    from ds_train.objectives.causal_lm import CausalLM

log = logging.getLogger(__name__)

PREFIX = "downstream"  # record keys: downstream/<task>/acc, downstream/<task>/acc_norm


@dataclass
class ScoredRow:
    """One (question, choice) pair: its tokens and how many of the last ones are the choice's.
    The tokens are an int32 array: 5-shot MMLU's 56k rows of ~500 tokens take 110 MB per rank
    that way, and over 1 GB as lists of Python ints."""

    tokens: np.ndarray
    choice_tokens: int


@dataclass
class MultipleChoiceTask:
    name: str
    rows: list[ScoredRow] = field(default_factory=list)  # each question's choices, in order
    choices: list[int] = field(default_factory=list)  # choices per question
    labels: list[int] = field(default_factory=list)
    choice_chars: list[int] = field(default_factory=list)  # per row: the choice's length in characters


def task_name(path: str) -> str:
    return Path(path).name.removesuffix(".jsonl").removesuffix(".json")


def load_tasks(
    paths: list[str], tokenizer: PreTrainedTokenizerBase, seq_len: int, bos: int | None, max_examples: int = 0
) -> list[MultipleChoiceTask]:
    """Read and tokenize each file (the first `max_examples` questions when > 0); ConfigError
    (one line, naming the file and line) for anything malformed. `bos`: the token the training
    documents start with (the shards' `bos_token_id`), put before each row."""
    names = [task_name(p) for p in paths]
    if len(set(names)) != len(names):
        raise ConfigError(f"data.downstream: two files share a task name ({', '.join(names)}): rename one")
    prefix = [] if bos is None else [bos]
    tasks = []
    for path, name in zip(paths, names):
        task = MultipleChoiceTask(name)
        with open(path, encoding="utf-8") as fh:
            for number, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                if max_examples and len(task.labels) == max_examples:
                    break
                context, choices, label = _question(line, f"{path}:{number}")
                before = (
                    prefix if context.strip() or prefix else _empty_context(tokenizer, f"{path}:{number}")
                )
                for choice in choices:
                    try:
                        tokens, n_choice = _encode_pair(tokenizer, before, context, choice)
                    except ValueError as e:
                        raise ConfigError(f"data.downstream {path}:{number}: {e}") from None
                    if n_choice > seq_len:
                        raise ConfigError(
                            f"data.downstream {path}:{number}: a choice of {n_choice} tokens does not fit seq_len {seq_len}"
                        )
                    kept = np.asarray(tokens[-(seq_len + 1) :], dtype=np.int32)  # the context's end
                    task.rows.append(ScoredRow(kept, n_choice))
                    task.choice_chars.append(len(choice))
                task.choices.append(len(choices))
                task.labels.append(label)
        if not task.labels:
            raise ConfigError(f"data.downstream: {path} holds no questions")
        tasks.append(task)
    return tasks


def _question(line: str, where: str) -> tuple[str, list[str], int]:
    try:
        q = json.loads(line)
        context, choices, label = q["context"], q["choices"], q["label"]
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(
            f"data.downstream {where}: expected a JSON object with context, choices and label ({e})"
        ) from None
    ok = isinstance(context, str) and isinstance(choices, list) and len(choices) >= 2
    if not ok or not all(isinstance(c, str) and c for c in choices):
        raise ConfigError(f"data.downstream {where}: context must be text and choices two or more texts")
    if not isinstance(label, int) or not 0 <= label < len(choices):
        raise ConfigError(f"data.downstream {where}: label must index choices (0..{len(choices) - 1})")
    return context, choices, label


def _empty_context(tokenizer: PreTrainedTokenizerBase, where: str) -> list[int]:
    """What a choice with no context (or spaces alone) is predicted from: lm-eval's prefix token,
    BOS if the tokenizer has one, else its document separator (EOS)."""
    token = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else document_separator(tokenizer)
    if token is None:
        raise ConfigError(f"data.downstream {where}: an empty context needs a BOS or EOS token to follow")
    return [token]


def _encode_pair(
    tokenizer: PreTrainedTokenizerBase, prefix: list[int], context: str, choice: str
) -> tuple[list[int], int]:
    """(tokens, how many at the end are the choice's), as lm-evaluation-harness builds and splits
    a pair: the choice follows its default target delimiter, one space; trailing spaces of the
    context move to the choice; the pair is encoded whole and the context's own encoding says
    where the choice begins. ValueError when the choice gets no token of its own, or nothing
    comes before it."""
    choice = " " + choice
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, choice = context[:-spaces], context[-spaces:] + choice
    whole = tokenizer(context + choice, add_special_tokens=False)["input_ids"]
    n_context = len(tokenizer(context, add_special_tokens=False)["input_ids"]) if context else 0
    n_choice = len(whole) - n_context
    if n_choice < 1:
        raise ValueError(f"the choice {choice!r} encodes to no token of its own")
    if len(prefix) + n_context < 1:
        raise ValueError("nothing comes before the choice to predict it from")
    return prefix + whole, n_choice


def _padded_length(n: int, limit: int) -> int:
    """Batches padded to a power of two (at least 32): few distinct shapes for compiled blocks;
    never past `limit`, the longest row (within seq_len, so within the model's positions)."""
    return min(max(32, 1 << (n - 1).bit_length()), limit)


def _batch(rows: list[ScoredRow], pad_id: int, chunked: bool, limit: int) -> dict[str, torch.Tensor]:
    width = _padded_length(max(len(r.tokens) - 1 for r in rows), limit)
    inputs = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for i, r in enumerate(rows):
        t = torch.from_numpy(r.tokens.astype(np.int64))
        inputs[i, : len(t) - 1] = t[:-1]
        labels[i, len(t) - 1 - r.choice_tokens : len(t) - 1] = t[-r.choice_tokens :]
    batch = {"input_ids": inputs, "labels": labels, "num_targets": (labels != IGNORE_INDEX).sum().float()}
    if chunked:
        batch["target_index"] = target_index(labels)
    return batch


@torch.no_grad()
def choice_scores(
    model: torch.nn.Module,
    objective: CausalLM,
    rows: list[ScoredRow],
    micro_batch_size: int,
    to_device: Callable[[dict], dict],
    device: torch.device,
    rank: int,
    world_size: int,
    pad_id: int,
) -> torch.Tensor:
    """Each row's summed log-probability of its choice tokens, on every rank (collective)."""
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i].tokens))  # tight batches
    longest = len(rows[order[0]].tokens) - 1
    per_step = micro_batch_size * world_size
    scores = torch.zeros(len(rows), dtype=torch.float64, device=device)
    chunked = bool(getattr(objective, "loss_chunk_tokens", 0))
    for first in range(0, len(order), per_step):
        mine = order[first + rank * micro_batch_size : first + (rank + 1) * micro_batch_size]
        # a rank past the end still runs a forward (ZeRO-3 gathers parameters with every rank)
        batch = _batch(
            [rows[i] for i in mine] or [rows[order[-1]]], pad_id, chunked, longest
        )  # or the shortest
        row_loss = objective.row_losses(model, to_device(batch)).double()
        if mine:
            scores[torch.tensor(mine, device=device)] = -row_loss[: len(mine)]
    return all_reduce_sum(scores)


def task_record(tasks: list[MultipleChoiceTask], scores: list[float]) -> dict:
    """`downstream/<task>/acc` and `acc_norm` from the rows' scores (tasks' rows in order)."""
    record, at = {}, 0  # `at`: the task's first row among all tasks' rows
    for task in tasks:
        right = right_norm = own = 0  # `own`: the question's first row within the task
        for n, label in zip(task.choices, task.labels):
            ll, chars = scores[at + own : at + own + n], task.choice_chars[own : own + n]
            right += max(range(n), key=lambda k: ll[k]) == label  # ties: the first, as numpy's argmax
            right_norm += max(range(n), key=lambda k: ll[k] / max(chars[k], 1)) == label
            own += n
        at += own
        record[f"{PREFIX}/{task.name}/acc"] = right / len(task.labels)
        record[f"{PREFIX}/{task.name}/acc_norm"] = right_norm / len(task.labels)
    return record


def chance(task: MultipleChoiceTask) -> float:
    """The accuracy of guessing: the mean of 1/choices."""
    return math.fsum(1 / n for n in task.choices) / len(task.choices)


def downstream_scorer(
    data: DataSection,
    tokenizer: PreTrainedTokenizerBase,
    objective: CausalLM,
    seq_len: int,
    bos: int | None,
    micro_batch_size: int,
    ctx: DistributedContext,
) -> Callable[[torch.nn.Module, Callable[[dict], dict]], dict] | None:
    """The trainer's evaluation hook for `data` (the config's data section) on this rank, or None
    without data.downstream: the tasks are read and tokenized once, here (`bos` as load_tasks).
    The hook takes the model and the trainer's batch mover, as evaluation_record does."""
    if not data.downstream:
        return None
    tasks = load_tasks(data.downstream, tokenizer, seq_len, bos, data.downstream_max_examples)
    if ctx.is_main:
        for t in tasks:
            log.info("data.downstream: %s, %d questions (chance %.3f)", t.name, len(t.labels), chance(t))
    pad_id = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)
    rows = [r for t in tasks for r in t.rows]

    def score(model: torch.nn.Module, to_device: Callable[[dict], dict]) -> dict:
        scores = choice_scores(
            model, objective, rows, micro_batch_size, to_device, ctx.device, ctx.rank, ctx.world_size, pad_id
        )
        return task_record(tasks, scores.tolist())

    return score
