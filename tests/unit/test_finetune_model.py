"""The task model: loaded weights intact, new heads drawn from (seed, module name) only, tied
weights kept; LoRA adapters seeded; the export merges LoRA into weights that equal base + adapter."""

from __future__ import annotations

import json

import pytest
import torch

from ds_train.config.schema import FinetuneSection, ModelSection
from ds_train.finetune.export import gather_full_state, save_merged_model
from ds_train.finetune.lora import apply_lora, trainable_summary
from ds_train.finetune.model import build_task_model, task_hf_config
from ds_train.model.build import verify_loaded_weights
from tests.helpers import REPO, TOKENIZER


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    """A tiny BERT base model (no task head) with a WordPiece tokenizer built from the stdlib BPE vocab."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer, BertTokenizerFast

    out = tmp_path_factory.mktemp("bert")
    bpe = AutoTokenizer.from_pretrained(str(TOKENIZER))
    vocab = [
        "[PAD]",
        "[UNK]",
        "[CLS]",
        "[SEP]",
        "[MASK]",
        *sorted(t for t in bpe.get_vocab() if t.isalnum())[:500],
    ]
    (out / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(out / "vocab.txt"))
    raw = json.loads((REPO / "configs/model/tiny-bert.json").read_text())
    config = AutoConfig.for_model(raw.pop("model_type"), vocab_size=len(tokenizer), **raw)
    torch.manual_seed(0)
    AutoModel.from_config(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _build(bert_dir, task, class_names=(), rng_seed=0):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(bert_dir))
    section = ModelSection(init_from=str(bert_dir))
    config = task_hf_config(task, section, str(bert_dir), tokenizer, list(class_names))
    torch.manual_seed(rng_seed)  # the global RNG must not matter
    return (
        build_task_model(task, section, config, weights_dir=str(bert_dir), seed=3, rank=0),
        config,
        tokenizer,
    )


def test_new_head_depends_on_the_seed_only_and_base_is_loaded(bert_dir):
    a, config, _ = _build(bert_dir, "classification", ["x", "y", "z"], rng_seed=1)
    b, _, _ = _build(bert_dir, "classification", ["x", "y", "z"], rng_seed=2)
    assert config.num_labels == 3 and config.id2label == {0: "x", 1: "y", 2: "z"}
    assert torch.equal(a.classifier.weight, b.classifier.weight)
    assert a.classifier.weight.std() > 0 and torch.all(a.classifier.bias == 0)
    verify_loaded_weights(a, str(bert_dir))  # every loaded tensor equals the file


def test_a_classifier_refined_for_another_number_of_classes_gets_a_new_head(bert_dir, tmp_path):
    """init_from a 6-class classifier for a 3-class task: transformers refused the checkpoint's
    head (ignore_mismatched_sizes), after `--check` had said ok; the head is now drawn afresh from
    the seed, like a head the base lacks, and the base weights are loaded and checked."""
    six, _, tokenizer = _build(bert_dir, "classification", list("abcdef"))
    six.save_pretrained(tmp_path / "six")
    tokenizer.save_pretrained(tmp_path / "six")
    a, config, _ = _build(tmp_path / "six", "classification", ["x", "y", "z"], rng_seed=1)
    b, _, _ = _build(tmp_path / "six", "classification", ["x", "y", "z"], rng_seed=2)
    assert a.classifier.weight.shape == (3, config.hidden_size)
    assert torch.equal(a.classifier.weight, b.classifier.weight) and a.classifier.weight.std() > 0
    assert torch.equal(a.bert.embeddings.word_embeddings.weight, six.bert.embeddings.word_embeddings.weight)
    verify_loaded_weights(a, str(tmp_path / "six"))  # the new head is not compared with the old


def test_mlm_head_is_drawn_but_the_tied_decoder_keeps_the_embeddings(bert_dir):
    from safetensors.torch import load_file

    model, _, _ = _build(bert_dir, "masked_lm")
    embeddings = load_file(str(bert_dir / "model.safetensors"))["embeddings.word_embeddings.weight"]
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
    assert torch.equal(model.cls.predictions.decoder.weight, embeddings)
    other, _, _ = _build(bert_dir, "masked_lm", rng_seed=9)
    assert torch.equal(
        model.cls.predictions.transform.dense.weight, other.cls.predictions.transform.dense.weight
    )


def test_lora_is_seeded_trains_adapters_and_head_and_merges_exactly(bert_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification

    section = FinetuneSection(task="classification", adapter="lora", lora_r=4, lora_alpha=8, lora_dropout=0.0)
    section.lora_target_modules = ["query", "value"]
    model, config, tokenizer = _build(bert_dir, "classification", ["x", "y"])
    torch.manual_seed(1)
    peft_a = apply_lora(model, section, seed=3)
    model_b, _, _ = _build(bert_dir, "classification", ["x", "y"])
    torch.manual_seed(2)
    peft_b = apply_lora(model_b, section, seed=3)
    a_params = dict(peft_a.named_parameters())
    for name, p in peft_b.named_parameters():
        assert torch.equal(p, a_params[name]), name
    trainable = [n for n, p in peft_a.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or "classifier" in n for n in trainable)
    assert trainable_summary(peft_a)[0] == sum(a_params[n].numel() for n in trainable)

    with torch.no_grad():  # as if trained: B away from its zero init, the head moved
        for name, p in peft_a.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.add_(torch.randn_like(p) * 0.1)
    peft_a.eval()
    inputs = tokenizer(["return the value", "parse the file"], padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = peft_a(**inputs).logits
    state = gather_full_state(peft_a, keep=True)
    save_merged_model(state, section, config, tokenizer, tmp_path / "hf")
    merged = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "hf")).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(**inputs).logits, expected, atol=1e-5, rtol=1e-5)
    assert not any("lora" in n for n, _ in merged.named_parameters())


def test_export_refuses_an_incomplete_state(bert_dir, tmp_path):
    model, config, tokenizer = _build(bert_dir, "classification", ["x", "y"])
    state = gather_full_state(model, keep=True)
    del state["classifier.weight"]
    with pytest.raises(RuntimeError, match="no tensor for 1 keys, e.g. classifier.weight"):
        save_merged_model(state, FinetuneSection(task="classification"), config, tokenizer, tmp_path / "hf")


def test_a_causal_export_generates_with_its_kv_cache(tmp_path):
    """Training builds the model with use_cache=False; the export turned it back on in config.json
    but not in generation_config.json, which generate() follows: no KV cache when serving."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    raw = json.loads((REPO / "configs/model/micro-llama.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZER))
    config = AutoConfig.for_model(
        raw.pop("model_type"), **{**raw, "vocab_size": len(tokenizer), "use_cache": False}
    )
    torch.manual_seed(0)
    state = gather_full_state(AutoModelForCausalLM.from_config(config), keep=True)
    save_merged_model(state, FinetuneSection(task="sft"), config, tokenizer, tmp_path / "hf")
    assert GenerationConfig.from_pretrained(str(tmp_path / "hf")).use_cache is True
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"))
    out = model.generate(
        torch.tensor([[5, 6, 7]]), max_new_tokens=2, return_dict_in_generate=True, pad_token_id=0
    )
    assert out.past_key_values is not None
