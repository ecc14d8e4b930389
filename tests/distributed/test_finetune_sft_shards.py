"""SFT from `ds-train shard --sft` shards on 2 ranks trains on exactly the batches of the same run
from the JSON-lines file: one shard and shuffle_window=1 make the loader's order the JSON-lines
path's order (one permutation of all rows per epoch from the seed), so the losses agree step by step."""

from __future__ import annotations

import pytest

from tests.helpers import MICRO_LLAMA, TOKENIZER, run_cli, torchrun, train_losses, write_config

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

SEQ_LEN = 48


def _config(run_dir, data: dict, finetune: dict) -> dict:
    return {
        "run": {"output_dir": str(run_dir), "seed": 5, "tensorboard": False},
        "model": {"config": str(MICRO_LLAMA), "tokenizer": str(TOKENIZER)},
        "data": {"num_workers": 0, "shuffle_window": 1, **data},
        "finetune": {"task": "sft", "seq_len": SEQ_LEN, "export_hf": False, **finetune},
        "train": {
            "max_steps": 4,
            "global_batch_size": 8,
            "micro_batch_size": 2,
            "lr": 3e-3,
            "warmup_steps": 1,
            "log_every": 1,
            "save_every": 0,
            "precision": "fp32",
        },
        "zero": {"stage": 2},
    }


def test_sft_from_shards_equals_sft_from_jsonl(tmp_path):
    from ds_train.demo.finetune_data import write_sft_data

    write_sft_data(tmp_path / "sft", max_examples=120, valid_fraction=0.0)
    jsonl = tmp_path / "sft" / "train.jsonl"
    shard = ["shard", jsonl, "--sft", "--output", tmp_path / "shards", "--tokenizer", TOKENIZER]
    run_cli([*shard, "--seq-len", SEQ_LEN, "--no-progress"])
    from_shards = tmp_path / "from_shards"
    cfg = _config(from_shards, {"train": str(tmp_path / "shards" / "train")}, {})
    torchrun(["finetune", write_config(tmp_path / "a.yaml", cfg)])
    from_jsonl = tmp_path / "from_jsonl"
    cfg = _config(from_jsonl, {}, {"train_file": str(jsonl)})
    torchrun(["finetune", write_config(tmp_path / "b.yaml", cfg)])

    a, b = train_losses(from_shards), train_losses(from_jsonl)
    assert sorted(a) == [1, 2, 3, 4]
    for step in a:
        assert a[step] == pytest.approx(b[step], rel=1e-5), f"step {step}: shards {a[step]} jsonl {b[step]}"
    assert a[4] < a[1]
