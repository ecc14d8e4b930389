"""Session fixtures: a small sharded corpus (from stdlib docstrings) every test can train on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import TOKENIZER


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """~600 stdlib docstrings as JSON lines."""
    from ds_train.demo.corpus import iter_docstrings

    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    with open(path, "w") as fh:
        for i, doc in enumerate(iter_docstrings()):
            if i == 600:
                break
            fh.write(json.dumps({"text": doc["text"]}) + "\n")
    return path


@pytest.fixture(scope="session")
def shards(tmp_path_factory, corpus) -> Path:
    """train/ and valid/ shard sets, seq_len 32, several small shards of uneven... (last) size."""
    from transformers import AutoTokenizer

    from ds_train.data.sharding import ShardOptions, shard_corpus

    out = tmp_path_factory.mktemp("shards")
    tok = AutoTokenizer.from_pretrained(str(TOKENIZER))
    shard_corpus(
        [str(corpus)],
        out,
        tok,
        ShardOptions(seq_len=32, valid_fraction=0.1, rows_per_shard=300, progress=False),
    )
    return out
