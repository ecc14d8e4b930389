"""`ds-train finetune` bad input: one-line errors from the preflight, before anything starts or is
written, and refusal to resume a run directory trained with another task setup."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from ds_train.config import ConfigError, from_dict
from ds_train.data.shard_set import DataError
from ds_train.finetune.preflight import preflight
from tests.helpers import MICRO_LLAMA, TOKENIZER, run_cli, write_config


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny Llama saved as a Hugging Face directory with the stdlib tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("hf")
    raw = json.loads(MICRO_LLAMA.read_text())
    config = AutoConfig.for_model(raw.pop("model_type"), vocab_size=4096, **raw)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(str(TOKENIZER)).save_pretrained(out)
    return out


def _config(tmp_path, hf_dir, **finetune):
    data = tmp_path / "train.jsonl"
    data.write_text(
        "".join(
            json.dumps({"text": f"text {i}", "label": "ab"[i % 2], "prompt": "p", "response": "r"}) + "\n"
            for i in range(8)
        )
    )
    raw = {
        "run": {"output_dir": str(tmp_path / "run"), "tensorboard": False},
        "model": {"init_from": str(hf_dir)},
        "finetune": {"task": "classification", "train_file": str(data), **finetune},
        "train": {"max_steps": 2, "global_batch_size": 4, "micro_batch_size": 2},
    }
    return raw


def _check(raw):
    cfg = from_dict(raw)
    return preflight(cfg)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"finetune": {"train_file": None}}, "missing required key 'finetune.train_file'"),
        ({"finetune": {"train_file": "/nonexistent/x.jsonl"}}, "finetune.train_file: file not found"),
        ({"finetune": {"train_file": "{tmp}/notes.txt"}}, "is not a JSON-lines file"),
        (
            {"data": {"train": "/some/shards"}},
            "not data.train; continued masked-LM pretraining on shards is `ds-train pretrain`",
        ),
        (
            {"data": {"train": "/some/shards"}, "finetune": {"task": "sft"}},
            "set either data.train/data.valid (SFT shards) or finetune.train_file",
        ),
        ({"model": {"init_from": "{tmp}"}}, "is neither a Hugging Face model directory"),
        ({"model": {"init_from": "/nonexistent/model"}}, "model.init_from: not found"),
        ({"finetune": {"chat_template": "tokenizer", "task": "sft"}}, "the tokenizer has no chat template"),
        ({"finetune": {"task": "masked_lm"}}, "needs a tokenizer with a mask token"),
        ({"run": {"output_dir": " "}}, "required key 'run.output_dir' is empty"),
        ({"finetune": {"adapter": "lora", "lora_r": 0}}, "finetune.lora_r must be > 0"),
        ({"finetune": {"adapter": "lora", "lora_target_modules": 5}}, "finetune.lora_target_modules must be"),
        (
            {
                "finetune": {"adapter": "lora", "lora_target_modules": ["query", "value"]}
            },  # BERT's, on a Llama
            "matches no layer of LlamaForSequenceClassification (its linear layers: down_proj, gate_proj,",
        ),
        (
            {"finetune": {"adapter": "lora"}, "train": {"export_hf_every": 1}},
            "train.export_hf_every converts checkpoints of whole models",
        ),
        ({"finetune": {"labels": ["a", "a"]}}, "finetune.labels has duplicates"),
        ({"finetune": {"labels": ["x", "y"], "task": "sft"}}, "only applies to task classification"),
        (
            {"finetune": {"text_pair_field": "b", "task": "sft"}},
            "text_pair_field only applies to task classification",
        ),
        ({"finetune": {"text_pair_field": "text"}}, "must name a field other than text_field"),
        (
            {"model": {"z_loss": 1e-4}},
            "model.z_loss applies to language-model objectives, not finetune.task=classification",
        ),
        ({"finetune": {"class_weights": [1, 2, 3]}}, "finetune.class_weights has 3 weights for 2 classes"),
        ({"finetune": {"class_weights": [1, -2]}}, "a list must hold positive numbers"),
        ({"finetune": {"class_weights": "inverse"}}, "must be none, balanced or a list of numbers"),
        (
            {"finetune": {"class_weights": "balanced", "task": "sft"}},
            "class_weights only applies to task classification",
        ),
        (
            {"finetune": {"text_pair_field": "premise"}},
            "field 'premise' (finetune.text_pair_field) must be a string",
        ),
        ({"finetune": {"labels": ["x", "y"]}}, "label 'a' is not one of the classes ['x', 'y']"),
        ({"finetune": {"valid_fraction": 1.5}}, "finetune.valid_fraction must be within [0, 1)"),
        ({"finetune": {"seq_len": 2}}, "finetune.seq_len must be ≥ 8"),
        ({"train": {"global_batch_size": 5}}, "not a multiple of train.micro_batch_size"),
    ],
)
def test_bad_finetune_input_is_one_line(tmp_path, hf_dir, change, expected):
    (tmp_path / "notes.txt").write_text("x")
    raw = _config(tmp_path, hf_dir)
    for section, values in change.items():
        for key, value in values.items():
            raw.setdefault(section, {})[key] = (
                value.replace("{tmp}", str(tmp_path)) if isinstance(value, str) else value
            )
    with pytest.raises((ConfigError, DataError)) as e:
        _check(raw)
    assert expected in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "run").exists(), "the preflight must not write anything"


def test_unwritable_output_dir_is_refused(tmp_path, hf_dir, monkeypatch):
    from ds_train.train import output_dir

    ro = tmp_path / "ro"
    ro.mkdir()
    real_access = os.access
    monkeypatch.setattr(output_dir.os, "access", lambda p, mode: Path(p) != ro and real_access(p, mode))
    raw = _config(tmp_path, hf_dir)
    raw["run"]["output_dir"] = str(ro / "run")
    with pytest.raises(ConfigError, match=r"run.output_dir .* cannot be created: .* is not writable"):
        _check(raw)


def test_lora_needs_a_base_model(tmp_path, hf_dir):
    raw = _config(tmp_path, hf_dir, adapter="lora")
    raw["model"] = {"config": str(MICRO_LLAMA), "tokenizer": str(TOKENIZER)}
    with pytest.raises(ConfigError, match="finetune.adapter=lora needs a trained base model"):
        _check(raw)


def test_preflight_reads_a_good_config(tmp_path, hf_dir):
    pre = _check(_config(tmp_path, hf_dir))
    assert pre.class_names == ["a", "b"] and pre.hf_config.num_labels == 2
    assert pre.hf_config.id2label == {0: "a", 1: "b"} and pre.resume_from is None


def _fake_checkpoint(run_dir, state):
    ckpt = run_dir / "checkpoints" / "step_00000002"
    ckpt.mkdir(parents=True)
    (ckpt / "ds_train_state.json").write_text(json.dumps({"step": 2, **state}))
    (run_dir / "checkpoints" / "latest").write_text("step_00000002")


def test_resume_refuses_another_task_setup(tmp_path, hf_dir):
    raw = _config(tmp_path, hf_dir)
    _fake_checkpoint(tmp_path / "run", {"finetune": {"class_names": ["neg", "pos"]}, "world_size": 1})
    with pytest.raises(ConfigError, match="trained with finetune class_names \\['neg', 'pos'\\]"):
        _check(raw)


def test_resume_refuses_changed_data(tmp_path, hf_dir):
    raw = _config(tmp_path, hf_dir)
    _fake_checkpoint(
        tmp_path / "run", {"world_size": 1, "data": {"fingerprint": "0" * 64, "seq_len": 512, "seed": 1234}}
    )
    with pytest.raises(ConfigError, match="was trained with other data: the contents of finetune.train_file"):
        _check(raw)


def test_force_resume_continues_a_finetune_on_other_data_and_batch_but_never_another_task(
    tmp_path, hf_dir, caplog
):
    raw = _config(tmp_path, hf_dir)
    saved = {"world_size": 1, "global_batch_size": 8, "data": {"fingerprint": "0" * 64, "seed": 1234}}
    _fake_checkpoint(tmp_path / "run", saved)
    with pytest.raises(ConfigError, match="train.global_batch_size=8 .*run.force_resume=true"):
        _check(raw)
    raw["run"]["force_resume"] = True
    assert _check(raw).resume_from.step == 2
    assert (
        "resuming" in caplog.text and "another example stream" in caplog.text and "other data" in caplog.text
    )
    raw["finetune"]["adapter"] = "lora"  # a different model is never forced through
    (tmp_path / "run" / "checkpoints" / "step_00000002" / "ds_train_state.json").write_text(
        json.dumps({"step": 2, **saved, "finetune": {"adapter": None}})
    )
    with pytest.raises(ConfigError, match="trained with finetune adapter None"):
        _check(raw)


def test_resume_refuses_other_parameter_groups(tmp_path, hf_dir):
    raw = _config(tmp_path, hf_dir)
    _fake_checkpoint(tmp_path / "run", {"world_size": 1, "decay_embeddings": True})
    assert _check(raw).resume_from.step == 2
    raw["train"]["embedding_weight_decay"] = False
    raw["run"]["force_resume"] = True  # the optimizer state cannot be moved: never forced through
    with pytest.raises(ConfigError, match="train.embedding_weight_decay=true \\(this run: false\\)"):
        _check(raw)
    raw["run"]["force_resume"] = False
    raw["finetune"]["adapter"] = "lora"  # trains no embedding table: the same groups either way
    assert _check(raw).resume_from.step == 2


def test_resume_refuses_another_example_order(tmp_path, hf_dir):
    raw = _config(tmp_path, hf_dir)
    _fake_checkpoint(tmp_path / "run", {"world_size": 1, "data": {"order": {"shuffle": False, "window": 1}}})
    with pytest.raises(ConfigError, match="data.shuffle=false \\(now data.shuffle=true\\)"):
        _check(raw)
    raw["data"] = {"shuffle": False}
    assert _check(raw).resume_from.step == 2


def test_cli_check_and_exit_status(tmp_path, hf_dir):
    good = write_config(tmp_path / "good.yaml", _config(tmp_path, hf_dir))
    out = run_cli(["finetune", good, "--check"])
    assert (
        out.stdout.startswith("ok: task classification | 4 = 2 micro × 2 accum × 1 ranks")
        and "classes ['a', 'b']" in out.stdout
    )
    bad = run_cli(["finetune", good, "finetune.task=sft", "finetune.chat_template=tokenizer"], check=False)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        "ds-train: error: finetune.chat_template=tokenizer but the tokenizer has no chat template "
        "(use auto or plain, or add chat_template to tokenizer_config.json)"
    ]


def test_check_tokenizes_json_lines_and_refuses_a_split_left_empty(tmp_path, hf_dir):
    """`--check` tokenizes the splits (in memory; nothing written) and prints what they give: a set
    whose every response is cut off by truncation used to pass it and be refused only at the start,
    after the job had waited in the queue."""
    from ds_train.finetune.preflight import check

    raw = _config(tmp_path, hf_dir, task="sft", seq_len=64)
    pre = check(from_dict(raw))
    assert pre.split_stats["train"]["examples"] == 8 and pre.split_stats["train"]["rows"] >= 1
    assert pre.split_stats["train"]["dropped_no_target"] == 0
    assert not (tmp_path / "run").exists(), "--check must not write anything"
    out = run_cli(["finetune", write_config(tmp_path / "good.yaml", raw), "--check"])
    assert "(8 examples → " in out.stdout

    long = tmp_path / "long.jsonl"  # every prompt longer than seq_len: no response token survives
    long.write_text("".join(json.dumps({"prompt": "word " * 100, "response": "r"}) + "\n" for _ in range(8)))
    raw["finetune"]["train_file"] = str(long)
    with pytest.raises(
        DataError, match=r"the train split has no usable example after tokenizing .*dropped_no_target 8"
    ):
        check(from_dict(raw))
    out = run_cli(["finetune", write_config(tmp_path / "bad.yaml", raw), "--check"], check=False)
    assert out.returncode == 2 and "no usable example" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize("task", ["classification", "sft"])
def test_epochs_count_the_tokenized_train_rows(tmp_path, hf_dir, task):
    """train.epochs for a JSON-lines fine-tune: one pass is the tokenized train split's rows
    (one per example for classification; packed rows for SFT), counted by the preflight."""
    from ds_train.finetune.preflight import check

    raw = _config(tmp_path, hf_dir, task=task)
    del raw["train"]["max_steps"]
    raw["train"]["epochs"] = 3
    cfg = from_dict(raw)
    pre = check(cfg)
    rows = pre.split_stats["train"]["rows"]
    assert rows == (8 if task == "classification" else rows) and rows >= 1
    assert cfg.train.max_steps == -(-3 * rows // 4)
    assert not (tmp_path / "run").exists()  # counted in memory: the preflight writes nothing
