"""`ds-train shard`: raw corpus files → tokenized, packed webdataset shards + manifests.

Output: `<output>/train/` and (with --valid-fraction) `<output>/valid/`, each holding
`<split>-NNNNNN.tar` shards and `index.json`. A document goes to validation when a hash of its
text falls under the fraction, so the split does not depend on order or parallelism.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ds_train.data.corpus_reader import iter_documents
from ds_train.data.packing import Packer
from ds_train.data.shard_format import ShardWriter, token_dtype, tokenizer_fingerprint, write_manifest

TOKENIZE_BATCH = 512


@dataclass
class ShardOptions:
    seq_len: int
    valid_fraction: float = 0.0
    text_field: str = "text"
    shard_bytes: int = 64 << 20
    rows_per_shard: int | None = None
    member_bytes: int = 1 << 20
    progress: bool = True

    def rows_per(self, row_bytes: int) -> tuple[int, int]:
        per_shard = self.rows_per_shard or max(1, self.shard_bytes // row_bytes)
        per_member = max(1, min(per_shard, self.member_bytes // row_bytes))
        return per_shard, per_member


def document_separator(tokenizer) -> int | None:
    """The token ending each packed document: EOS, or [SEP] for BERT-style tokenizers without one."""
    return tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id


def is_valid_doc(text: str, fraction: float) -> bool:
    if fraction <= 0:
        return False
    h = int.from_bytes(hashlib.blake2b(text.encode("utf-8", "replace"), digest_size=8).digest(), "little")
    return h / 2**64 < fraction


def shard_corpus(inputs: list[str], output: str | Path, tokenizer, opts: ShardOptions) -> dict[str, dict]:
    """Tokenize and pack `inputs` (in order) into shard sets; returns {split: manifest}."""
    output = Path(output)
    dtype = token_dtype(len(tokenizer))
    row_bytes = (opts.seq_len + 1) * dtype.itemsize
    per_shard, per_member = opts.rows_per(row_bytes)
    splits = ["train", "valid"] if opts.valid_fraction > 0 else ["train"]
    writers = {s: ShardWriter(output / s, s, opts.seq_len, dtype, per_shard, per_member) for s in splits}
    packers = {
        s: Packer(opts.seq_len, document_separator(tokenizer), tokenizer.pad_token_id, writers[s].add)
        for s in splits
    }
    meter = _Meter(opts.progress)
    for path in inputs:
        for texts in _batches(iter_documents(path, opts.text_field), TOKENIZE_BATCH):
            ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
            for text, tokens in zip(texts, ids):
                packers["valid" if is_valid_doc(text, opts.valid_fraction) else "train"].add(tokens)
            meter.update(len(texts), sum(len(t) + 1 for t in ids))
    meter.close()
    fingerprint = tokenizer_fingerprint(tokenizer)
    manifests = {}
    for s in splits:
        packers[s].finish()
        writers[s].flush()
        manifests[s] = write_manifest(
            output / s,
            split=s,
            seq_len=opts.seq_len,
            dtype=dtype,
            tokenizer=fingerprint,
            shards=writers[s].stats,
            extra={"inputs": [str(p) for p in inputs], "valid_fraction": opts.valid_fraction},
        )
    return manifests


def _batches(it: Iterable[str], n: int):
    batch = []
    for item in it:
        batch.append(item)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


class _Meter:
    """tqdm bar with docs/s and tokens/s."""

    def __init__(self, enabled: bool):
        self.t0 = time.perf_counter()
        self.docs = self.tokens = 0
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(unit=" docs", desc="shard", dynamic_ncols=True)

    def update(self, docs: int, tokens: int) -> None:
        self.docs += docs
        self.tokens += tokens
        if self.bar is not None:
            dt = max(time.perf_counter() - self.t0, 1e-9)
            self.bar.update(docs)
            self.bar.set_postfix_str(
                f"{self.docs / dt:,.0f} docs/s {self.tokens / dt:,.0f} tok/s", refresh=False
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
