"""`model.attn_implementation`: every kernel keeps packed documents apart as the default (sdpa)
does, and FlexAttention, which torch cannot train on a CPU, is refused before any work there.

FlexAttention's forward runs on a CPU (compiled by inductor), so its masking is checked here on
ds_train's own packed batches; its training speed is measured by bench/gpu.sh (`flex_attention`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist

from ds_train.cli import main
from ds_train.config.schema import ModelSection
from ds_train.model.build import attention_problem, build_model, load_hf_config, load_tokenizer
from ds_train.objectives.causal_lm import CausalLM
from tests.helpers import MICRO_LLAMA, TOKENIZER, base_config, write_config


def _logits(attn: str, batch: dict, *, document_masking: bool = True) -> torch.Tensor:
    section = ModelSection(config=str(MICRO_LLAMA), tokenizer=str(TOKENIZER), attn_implementation=attn)
    tokenizer = load_tokenizer(section)
    model = build_model(section, load_hf_config(section, tokenizer), seed=0, rank=0).eval()
    with torch.no_grad():  # no_grad: FlexAttention has no CPU backward
        position_ids = batch["position_ids"] if document_masking else None
        return model(input_ids=batch["input_ids"], position_ids=position_ids).logits


# flex_attention compiles its kernel on first use (~10 s on 2 cores): out of the quick loop
@pytest.mark.parametrize("attn", ["eager", pytest.param("flex_attention", marks=pytest.mark.slow)])
def test_each_kernel_keeps_packed_documents_apart_as_sdpa_does(attn):
    eos = load_tokenizer(ModelSection(config=str(MICRO_LLAMA), tokenizer=str(TOKENIZER))).eos_token_id
    rng = np.random.default_rng(0)
    row = rng.integers(10, 4000, size=(2, 161))
    row[0, 70] = row[1, 20] = row[1, 120] = eos  # documents of 71 + 90 tokens, and 21 + 100 + 40
    batch = CausalLM(eos_id=eos).collate(row, np.arange(2))
    reference = _logits("sdpa", batch)
    logits = _logits(attn, batch)
    torch.testing.assert_close(logits, reference, atol=2e-5, rtol=1e-4)
    # the second document of row 0 on its own: what it sees when nothing leaks from the first
    alone = CausalLM(eos_id=eos).collate(row[:1, 71:], np.arange(1))
    torch.testing.assert_close(logits[0, 71:], _logits(attn, alone)[0], atol=2e-5, rtol=1e-4)
    # and the check can fail: without the document positions the first document is seen
    unmasked = _logits(attn, batch, document_masking=False)
    assert (unmasked[0, 71:] - logits[0, 71:]).abs().max() > 1e-3


def test_flex_attention_is_refused_on_a_cpu_and_allowed_on_a_gpu(monkeypatch):
    assert attention_problem("sdpa") is None and attention_problem("eager") is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "needs a CUDA GPU" in attention_problem("flex_attention")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert attention_problem("flex_attention") is None


def test_flex_attention_on_a_cpu_is_one_line_before_any_work(tmp_path, shards, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = write_config(tmp_path / "run.yaml", base_config(tmp_path / "run", shards))
    code = main(["pretrain", str(cfg), "model.attn_implementation=flex_attention"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "flex_attention needs a CUDA GPU" in err and "\n" not in err, err
    assert not dist.is_initialized() and not (tmp_path / "run").exists()
