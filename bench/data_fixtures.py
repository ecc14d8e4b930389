"""Synthetic shard sets for the data benchmarks: real ds_train shards of random tokens, written
with the sharder's own writer, so readers see exactly the production format."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ds_train.data.shard_format import MANIFEST, write_manifest, write_shard

FAKE_TOKENIZER = {"name_or_path": "synthetic", "sha256": "synthetic", "vocab_size": 32000, "eos_token_id": 0}


def synthetic_shards(
    out: Path, *, shards: int, rows: int, seq_len: int, member_bytes: int = 1 << 20, seed: int = 0
) -> Path:
    """`shards` shards of `rows` rows of seq_len + 1 uint16 tokens (a document every ~700 tokens)."""
    if (out / MANIFEST).exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    per_member = max(1, member_bytes // ((seq_len + 1) * 2))
    stats = []
    for i in range(shards):
        block = rng.integers(1, 32000, size=(rows, seq_len + 1), dtype=np.uint16)
        starts = [sorted(rng.choice(seq_len, size=3, replace=False).tolist()) for _ in range(rows)]
        for r, s in enumerate(starts):
            block[r, [c - 1 for c in s if c > 0]] = 0  # an EOS before each document start
        stats.append(write_shard(out, f"train-{i:06d}.tar", block, starts, per_member, [700] * (3 * rows)))
    write_manifest(
        out, split="train", seq_len=seq_len, dtype=np.uint16, tokenizer=FAKE_TOKENIZER, shards=stats
    )
    return out
