"""Examples → token arrays, per task (run once per split by rank 0, then memory-mapped).

- sft: chat-formatted text, tokenized with character offsets so each token knows whether it lies
  in a response span (a loss target); examples longer than seq_len + 1 tokens are truncated,
  those left without a target are dropped; packed whole into rows of seq_len + 1 (packing.py).
- classification: text truncated to seq_len tokens (with the tokenizer's special tokens), its
  length and class id.
- masked_lm: documents packed into rows of seq_len + 1 with the pretraining packer (documents
  separated by EOS, or [SEP] for BERT-style tokenizers), the layout pretraining shards have, so
  the pretraining objective applies unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np

from ds_train.config.schema import FinetuneSection
from ds_train.data.document_framing import document_separator, document_start
from ds_train.data.packing import Packer
from ds_train.data.shard_format import token_dtype
from ds_train.finetune.chat import ChatFormat, to_messages
from ds_train.finetune.packing import ExamplePacker
from ds_train.finetune.records import Example, label_id

TOKENIZE_BATCH = 256


def encode_split(
    section: FinetuneSection,
    examples: Iterable[Example],
    tokenizer,
    *,
    class_names: list[str],
    chat: ChatFormat | None,
) -> tuple[dict[str, np.ndarray], dict]:
    """(arrays, stats) of one split. Every array's first axis is the row."""
    if section.task == "sft":
        arrays, stats = _encode_sft(section, examples, tokenizer, chat)
    elif section.task == "classification":
        arrays, stats = _encode_classification(section, examples, tokenizer, class_names)
    else:
        arrays, stats = _encode_masked_lm(section, examples, tokenizer)
    arrays["tokens"] = arrays["tokens"].astype(token_dtype(len(tokenizer)))
    stats["rows"] = len(arrays["tokens"])
    return arrays, stats


def pad_id(tokenizer) -> int:
    """Filler for row tails; never a target, so any id works when the tokenizer has no pad token."""
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.sep_token_id):
        if value is not None:
            return int(value)
    return 0


def target_flags(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> np.ndarray:
    """Per token: does its character range overlap a target span? Added special tokens ((0, 0)) never do."""
    flags = np.zeros(len(offsets), dtype=bool)
    if not spans or not offsets:
        return flags
    off = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    for a, b in spans:
        flags |= (off[:, 0] < b) & (off[:, 1] > a) & (off[:, 1] > off[:, 0])
    return flags


def _encode_sft(section, examples, tokenizer, chat: ChatFormat) -> tuple[dict, dict]:
    width = section.seq_len + 1
    packer = ExamplePacker(width, pad_id(tokenizer), pack=section.packing)
    where: list[tuple[int, int]] = []
    stats = {"examples": 0, "truncated": 0, "dropped_no_target": 0, "target_tokens": 0, "tokens": 0}
    for batch in _batched(examples):
        rendered = [
            chat.render(
                to_messages(
                    ex.record,
                    prompt=section.prompt_field,
                    response=section.response_field,
                    system=section.system_field,
                    messages=section.messages_field,
                ),
                train_on_inputs=section.train_on_inputs,
            )
            for ex in batch
        ]
        enc = tokenizer(
            [r.text for r in rendered],
            add_special_tokens=rendered[0].add_special_tokens,
            return_offsets_mapping=True,
        )
        for ex, r, ids, offsets in zip(batch, rendered, enc["input_ids"], enc["offset_mapping"]):
            stats["examples"] += 1
            flags = target_flags(offsets, r.targets)
            if len(ids) > width:
                stats["truncated"] += 1
                ids, flags = ids[:width], flags[:width]
            if not flags[1:].any():
                stats["dropped_no_target"] += 1
                continue
            packer.add(np.asarray(ids, dtype=np.int64), flags, len(where))
            where.append((ex.file, ex.line))
            stats["tokens"] += len(ids)
            stats["target_tokens"] += int(flags[1:].sum())
    arrays = packer.finish()
    arrays["where"] = np.asarray(where, dtype=np.int64).reshape(-1, 2)
    stats["packing_efficiency"] = stats["tokens"] / max(1, arrays["tokens"].size)
    return arrays, stats


def _encode_classification(section, examples, tokenizer, class_names) -> tuple[dict, dict]:
    rows, lengths, labels, where, segments = [], [], [], [], []
    truncated = 0
    pair_field = section.text_pair_field
    # segment ids only for models that embed them (BERT-style): a Llama tokenizer has none to give
    with_segments = pair_field is not None and "token_type_ids" in tokenizer.model_input_names
    for batch in _batched(examples):
        enc = tokenizer(
            [ex.record[section.text_field] for ex in batch],
            [ex.record[pair_field] for ex in batch] if pair_field else None,
            add_special_tokens=True,
            truncation="longest_first" if pair_field else True,
            max_length=section.seq_len,
            return_overflowing_tokens=False,
            return_token_type_ids=with_segments,
        )
        for k, (ex, ids) in enumerate(zip(batch, enc["input_ids"])):
            row = np.full(section.seq_len, pad_id(tokenizer), dtype=np.int64)
            row[: len(ids)] = ids
            if with_segments:
                segment = np.zeros(section.seq_len, dtype=np.uint8)
                segment[: len(ids)] = enc["token_type_ids"][k]
                segments.append(segment)
            truncated += len(ids) == section.seq_len
            rows.append(row)
            lengths.append(len(ids))
            labels.append(label_id(ex.record[section.label_field], class_names))
            where.append((ex.file, ex.line))
    arrays = {
        "tokens": np.stack(rows) if rows else np.zeros((0, section.seq_len), dtype=np.int64),
        "lengths": np.asarray(lengths, dtype=np.int32),
        "labels": np.asarray(labels, dtype=np.int64),
        "origin": np.arange(len(rows), dtype=np.int64),
        "where": np.asarray(where, dtype=np.int64).reshape(-1, 2),
    }
    if with_segments:  # which text of the pair each token belongs to (token_type_ids)
        arrays["segments"] = np.stack(segments) if segments else np.zeros((0, section.seq_len), np.uint8)
    counts = np.bincount(arrays["labels"], minlength=len(class_names))
    stats = {
        "examples": len(rows),
        "at_seq_len_limit": int(truncated),
        "class_counts": dict(zip(class_names, counts.tolist())),
    }
    return arrays, stats


def _encode_masked_lm(section, examples, tokenizer) -> tuple[dict, dict]:
    rows: list[np.ndarray] = []
    origin: list[int] = []
    where: list[tuple[int, int]] = []

    def sink(row: np.ndarray, starts: list[int], finished: list[int]) -> None:
        rows.append(row.copy())
        origin.append(max(0, len(where) - 1))  # the document being added when the row filled

    packer = Packer(section.seq_len, document_separator(tokenizer), tokenizer.pad_token_id, sink)
    # each document framed as `ds-train shard --bos auto` frames it: RoBERTa's and XLM-R's <s> first
    start = [] if (bos := document_start(tokenizer)) is None else [bos]
    for batch in _batched(examples):
        enc = tokenizer([ex.record[section.text_field] for ex in batch], add_special_tokens=False)
        for ex, ids in zip(batch, enc["input_ids"]):
            where.append((ex.file, ex.line))
            packer.add(start + ids)
    packer.finish()
    width = section.seq_len + 1
    arrays = {
        "tokens": np.stack(rows) if rows else np.zeros((0, width), dtype=np.int64),
        "origin": np.asarray(origin, dtype=np.int64),
        "where": np.asarray(where, dtype=np.int64).reshape(-1, 2),
    }
    return arrays, {"examples": len(where), "tokens": packer.tokens}


def _batched(examples: Iterable[Example]) -> Iterator[list[Example]]:
    batch: list[Example] = []
    for ex in examples:
        batch.append(ex)
        if len(batch) == TOKENIZE_BATCH:
            yield batch
            batch = []
    if batch:
        yield batch
