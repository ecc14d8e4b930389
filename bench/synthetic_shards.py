"""Real ds-train shards of random tokens, for benchmarks that must not need a corpus (offline)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
TOKENIZER = REPO / "configs/tokenizers/stdlib-bpe-4k"


def synthetic_shards(out: Path, *, rows: int, seq_len: int, seed: int = 0) -> Path:
    """Real ds-train shards (the sharder's writer and manifest) of random tokens."""
    from transformers import AutoTokenizer

    from ds_train.data.shard_format import (
        MANIFEST,
        token_dtype,
        tokenizer_fingerprint,
        write_manifest,
        write_shard,
    )

    if (out / MANIFEST).exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(str(TOKENIZER))
    rng = np.random.default_rng(seed)
    dtype = token_dtype(len(tok))
    block = rng.integers(0, len(tok), size=(rows, seq_len + 1)).astype(dtype)
    block[block == tok.eos_token_id] = 1
    starts = []
    for r in range(rows):
        cuts = np.cumsum(rng.geometric(1 / 1000, size=16))
        cuts = cuts[cuts < seq_len + 1].tolist()
        block[r, cuts] = tok.eos_token_id
        starts.append([0] + [c + 1 for c in cuts if c + 1 <= seq_len])
    per_shard = max(1, rows // 4)
    stats = [
        write_shard(out, f"train-{i:06d}.tar", block[lo : lo + per_shard], starts[lo : lo + per_shard], 64)
        for i, lo in enumerate(range(0, rows, per_shard))
    ]
    write_manifest(out, split="train", seq_len=seq_len, dtype=dtype, tokenizer=tokenizer_fingerprint(tok),
                   shards=stats)  # fmt: skip
    return out
