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


def test_sft_on_a_mixture_of_shard_sets_logs_each_sources_training_loss(tmp_path):
    from ds_train.demo.finetune_data import write_sft_data
    from tests.helpers import read_metrics

    write_sft_data(tmp_path / "sft", max_examples=120, valid_fraction=0.0)
    for name, rows in (("chat", slice(0, 60)), ("code", slice(60, 120))):  # two halves, two sets
        lines = (tmp_path / "sft" / "train.jsonl").read_text().splitlines()[rows]
        (tmp_path / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
        shard = [
            "shard",
            tmp_path / f"{name}.jsonl",
            "--sft",
            "--output",
            tmp_path / name,
            "--tokenizer",
            TOKENIZER,
        ]
        run_cli([*shard, "--seq-len", SEQ_LEN, "--no-progress"])
    mixture = [
        {"path": str(tmp_path / "chat" / "train"), "weight": 1, "name": "chat"},
        {"path": str(tmp_path / "code" / "train"), "weight": 1, "name": "code"},
    ]
    cfg = _config(tmp_path / "run", {"train": mixture}, {})
    run_cli(["finetune", write_config(tmp_path / "mix.yaml", cfg), "zero.stage=0"])
    records = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert len(records) == 4
    for r in records:
        assert r["mix/chat"] + r["mix/code"] == pytest.approx(1.0) and r["mix/chat"] > 0
        low, high = sorted([r["loss/chat"], r["loss/code"]])
        assert low <= r["loss"] <= high
