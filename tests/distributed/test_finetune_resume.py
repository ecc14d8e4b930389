"""SFT straight from a `ds-train pretrain` run directory (no manual conversion), and a fine-tuning
run killed mid-way resumes to the same losses as the uninterrupted one, step for step, with dropout
on (each step's draws depend on the seed, step and rank alone)."""

from __future__ import annotations

import json

import pytest

from ds_train.checkpoint.layout import latest_checkpoint
from tests.helpers import (
    MICRO_LLAMA,
    base_config,
    read_metrics,
    run_cli,
    torchrun,
    train_losses,
    write_config,
)

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, shards):
    """A micro Llama with attention dropout, pretrained for a few steps (one process), saved as a
    ds_train run directory. The dropout makes the resume below depend on the training mode and
    the random draws of each step: a fine-tune (from_pretrained) started in eval mode, so dropout
    was off until the first evaluation, and off again after a resume."""
    root = tmp_path_factory.mktemp("pretrain")
    model = root / "micro-llama-dropout.json"
    model.write_text(json.dumps({**json.loads(MICRO_LLAMA.read_text()), "attention_dropout": 0.1}))
    cfg = base_config(
        root / "run",
        shards,
        model={"config": str(model)},
        train={"max_steps": 4, "lr": 5e-3},
        zero={"stage": 3},
    )
    run_cli(["pretrain", write_config(root / "pretrain.yaml", cfg)])
    return root / "run"


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory):
    from ds_train.demo.finetune_data import write_sft_data

    out = tmp_path_factory.mktemp("sft")
    write_sft_data(out, max_examples=240, valid_fraction=0.1)
    return out


def _config(run_dir, pretrained, sft_data):
    return {
        "run": {"output_dir": str(run_dir), "seed": 11, "tensorboard": False},
        "model": {"init_from": str(pretrained)},
        "data": {"num_workers": 1},
        "finetune": {
            "task": "sft",
            "train_file": str(sft_data / "train.jsonl"),
            "valid_file": str(sft_data / "valid.jsonl"),
            "seq_len": 48,
        },
        "train": {
            "max_steps": 8,
            "global_batch_size": 8,
            "micro_batch_size": 2,
            "lr": 3e-3,
            "warmup_steps": 2,
            "log_every": 1,
            "save_every": 4,
            "eval_every": 4,
            "precision": "fp32",
        },
        "zero": {"stage": 3},
    }


def test_sft_from_pretrain_run_dir_and_exact_resume(tmp_path, pretrained, sft_data):
    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    straight = tmp_path / "straight"
    torchrun(["finetune", write_config(tmp_path / "a.yaml", _config(straight, pretrained, sft_data))])

    # the pretraining checkpoint was converted without a manual step, weights intact
    ref = latest_checkpoint(pretrained / "checkpoints")
    expected = get_fp32_state_dict_from_zero_checkpoint(str(ref.root), tag=ref.tag)
    converted = {
        k: v
        for f in sorted((straight / "base_model").glob("*.safetensors"))
        for k, v in load_file(str(f)).items()
    }
    for name, tensor in expected.items():
        assert torch.equal(converted[name], tensor), name
    # (and the run compared what it loaded with these files: verify_loaded_weights)

    resumed = tmp_path / "resumed"
    cfg = write_config(tmp_path / "b.yaml", _config(resumed, pretrained, sft_data))
    killed = torchrun(["finetune", cfg], env={"DS_TRAIN_FAULT": "kill@step=6"}, check=False)
    assert killed.returncode != 0 and latest_checkpoint(resumed / "checkpoints").step == 4
    torchrun(["finetune", cfg])  # the same command again: resumes from step 4
    assert [r["step"] for r in read_metrics(resumed) if "loss" in r] == [1, 2, 3, 4, 5, 5, 6, 7, 8]
    a, b = train_losses(straight), train_losses(resumed)
    for step in range(1, 9):
        assert b[step] == pytest.approx(a[step], rel=1e-6, abs=0), f"step {step}: {b[step]} vs {a[step]}"
    valid = [[r["valid_loss"] for r in read_metrics(d) if "valid_loss" in r] for d in (straight, resumed)]
    assert valid[1][-1] == pytest.approx(valid[0][-1], rel=1e-6)
    assert (resumed / "base_model" / "ds_train_source.json").is_file()

    # the export: stock transformers loads it, the tokenizer formats prompts as training did
    model = AutoModelForCausalLM.from_pretrained(str(resumed / "hf"))
    tokenizer = AutoTokenizer.from_pretrained(str(resumed / "hf"))
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt == "### User:\nhi\n\n### Assistant:\n"
    assert model.config.architectures == ["LlamaForCausalLM"]
    card = (resumed / "hf" / "README.md").read_text()
    assert str(pretrained) in card and "valid_loss" in card and "train.jsonl" in card

    # the same command once more: the run is finished; it does not evaluate again, and the card
    # it exports again keeps the final evaluation (it came out without one: review)
    (resumed / "hf" / "README.md").unlink()
    torchrun(["finetune", cfg])
    assert len([r for r in read_metrics(resumed) if "valid_loss" in r]) == len(valid[1])
    card = (resumed / "hf" / "README.md").read_text()
    assert f"| valid_loss | {valid[1][-1]:.4g} |" in card and "| train loss (last logged step 8) |" in card
