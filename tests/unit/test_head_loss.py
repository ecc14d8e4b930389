"""The chunked, target-only head loss equals transformers' full-logits loss, value and gradients,
for causal LM (with padding), masked LM and SFT; models it cannot stand in for fall back."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM

from ds_train.finetune.sft import SupervisedFineTuning
from ds_train.objectives import head_loss
from ds_train.objectives.base import IGNORE_INDEX, ignore_rows, summed_cross_entropy
from ds_train.objectives.causal_lm import CausalLM
from ds_train.objectives.head_loss import fused_head, linear_cross_entropy_sum, lm_loss_sum
from ds_train.objectives.masked_lm import MaskedLM
from tests.helpers import MICRO_LLAMA, REPO

VOCAB = 97


def reference(hidden, weight, bias, labels):
    logits = torch.nn.functional.linear(hidden, weight, bias)
    return summed_cross_entropy(logits, labels)


def leaves(n=37, h=16, bias=True, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, h, generator=g, dtype=dtype).requires_grad_()
    weight = (torch.randn(VOCAB, h, generator=g) * 0.3).to(dtype).requires_grad_()
    b = (torch.randn(VOCAB, generator=g) * 0.1).to(dtype).requires_grad_() if bias else None
    labels = torch.randint(0, VOCAB, (n,), generator=g)
    return hidden, weight, b, labels


def grads(fn, tensors, scale=3.0):
    for t in tensors:
        t.grad = None
    loss = fn()
    (loss * scale).backward()  # the trainer scales the summed loss: the backward must pass it on
    return loss.detach(), [t.grad.clone() for t in tensors]


@pytest.mark.parametrize("chunk", [1, 8, 37, 1000])
def test_linear_cross_entropy_matches_full_logits(chunk):
    hidden, weight, bias, labels = leaves()
    ref_loss, ref_grads = grads(lambda: reference(hidden, weight, bias, labels), [hidden, weight, bias])
    loss, got = grads(
        lambda: linear_cross_entropy_sum(hidden, weight, bias, labels, chunk), [hidden, weight, bias]
    )
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-6)
    for name, a, b in zip(("hidden", "weight", "bias"), got, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("chunk", [1, 8, 1000])
def test_z_loss_gradients_match_autograd_of_the_full_logits(chunk):
    """model.z_loss (pretraining audit): z · sum (log Z)² added in the chunked forward, its
    gradient 2z·log Z·softmax folded into the logits' gradient; checked against autograd."""
    from ds_train.objectives.head_loss import linear_cross_entropy_z

    z = 0.05
    hidden, weight, bias, labels = leaves()

    def full():
        logits = torch.nn.functional.linear(hidden, weight, bias)
        return summed_cross_entropy(logits, labels) + z * torch.logsumexp(logits, -1).square().sum()

    ref_loss, ref_grads = grads(full, [hidden, weight, bias])
    loss, got = grads(
        lambda: linear_cross_entropy_z(hidden, weight, bias, labels, chunk, z)[0], [hidden, weight, bias]
    )
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-6)
    for name, a, b in zip(("hidden", "weight", "bias"), got, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    ce = linear_cross_entropy_sum(hidden, weight, bias, labels, chunk)
    z_term = linear_cross_entropy_z(hidden, weight, bias, labels, chunk, z)[1]
    assert z_term.item() == pytest.approx(ref_loss.item() - ce.item(), rel=1e-5) and z_term.item() > 0


def test_frozen_head_and_no_grad():
    hidden, weight, _, labels = leaves(bias=False)
    weight.requires_grad_(False)  # e.g. LoRA: the head is frozen, only the hidden states need grads
    ref_loss, (ref_h,) = grads(lambda: reference(hidden, weight, None, labels), [hidden])
    loss, (got_h,) = grads(lambda: linear_cross_entropy_sum(hidden, weight, None, labels, 5), [hidden])
    assert loss.item() == pytest.approx(ref_loss.item())
    torch.testing.assert_close(got_h, ref_h)
    assert weight.grad is None
    with torch.no_grad():  # evaluation: the forward-only path
        assert linear_cross_entropy_sum(hidden, weight, None, labels, 5).item() == pytest.approx(
            ref_loss.item()
        )


def test_bf16_is_as_accurate_as_full_logits():
    hidden, weight, bias, labels = leaves(n=64, h=32, dtype=torch.bfloat16)
    exact = [t.detach().double().requires_grad_() for t in (hidden, weight, bias)]
    _, truth = grads(lambda: reference(*exact, labels), exact)
    _, full = grads(lambda: reference(hidden, weight, bias, labels), [hidden, weight, bias])
    loss, got = grads(
        lambda: linear_cross_entropy_sum(hidden, weight, bias, labels, 16), [hidden, weight, bias]
    )
    assert loss.dtype == torch.float32 and got[1].dtype == torch.bfloat16
    for name, g, f, t in zip(("hidden", "weight", "bias"), got, full, truth):
        # the loss scale multiplies the stored bf16 gradient: at most one more rounding (2^-8 relative)
        err, full_err = (g.double() - t).abs().max(), (f.double() - t).abs().max()
        assert err <= full_err + t.abs().max() * 2**-8, f"{name}: {err:.2e} vs full logits {full_err:.2e}"
        assert err < t.abs().max() * 2**-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab,hidden", [(4000, 64), (4000, 256)])
def test_memory_is_one_chunk_of_logits_and_one_weight_gradient(dtype, vocab, hidden):
    """Peak of forward + backward: the fp32 accumulators and the hidden states' gradient, plus one
    chunk's logits at a time, never two chunks' nor a second [vocab, hidden] fp32 copy: the formula
    `ds-train plan` uses (ds_train/plan/memory_estimate.py)."""
    from ds_train.plan.memory_estimate import PRECISIONS, HeadLoss, loss_peak_bytes
    from ds_train.plan.model_shape import ModelShape
    from tests.tensor_memory import LiveTensorBytes

    n, chunk = 1024, 256
    g = torch.Generator().manual_seed(0)
    hidden_states = torch.randn(n, hidden, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, hidden, generator=g) * 0.1).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, (n,), generator=g)
    with LiveTensorBytes() as meter:
        linear_cross_entropy_sum(hidden_states, weight, None, labels, chunk).backward()
    e = hidden_states.element_size()
    shape = ModelShape(0, 1, hidden, 1, hidden, hidden, vocab, False, 0)
    precision = PRECISIONS["bf16" if dtype is torch.bfloat16 else "fp32"]
    kept = 4 * vocab * hidden + e * n * hidden  # the weight's fp32 accumulator, the hidden gradient
    estimate = kept + loss_peak_bytes(shape, 1, n, precision, HeadLoss(chunk_tokens=chunk))
    assert meter.peak == pytest.approx(estimate, rel=1e-3)  # (+ a few bytes: the scalar loss)
    assert meter.peak < 0.4 * 12 * n * vocab  # full logits: their fp32 log-softmax and two gradients


def model_from(path_or_dict, auto=AutoModelForCausalLM, **overrides):
    raw = json.loads(path_or_dict.read_text()) if not isinstance(path_or_dict, dict) else dict(path_or_dict)
    raw.update(vocab_size=VOCAB, **overrides)
    config = AutoConfig.for_model(raw.pop("model_type"), **raw)
    torch.manual_seed(0)
    return auto.from_config(config, attn_implementation="eager").eval()  # eval: no dropout


def compare_objective(model, full, chunked, rows, sample_ids):
    """Loss and every parameter gradient of objective `chunked` vs the same objective with full logits."""
    out = []
    for objective in (full, chunked):
        model.zero_grad()
        batch = objective.collate(rows, sample_ids)
        loss = objective.loss_sum(model, batch)
        loss.backward()
        out.append(
            (loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        )
    (ref_loss, ref_grads), (loss, got) = out
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    assert got.keys() == ref_grads.keys() and ref_grads
    for name in ref_grads:
        torch.testing.assert_close(got[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    return batch


def test_z_loss_of_the_chunked_head_equals_full_logits():
    """The objective's z-loss is the same through the chunked head and from full logits, and the
    term alone is handed to the trainer (batch["z_loss"]) to be logged apart from the loss."""
    model = model_from(MICRO_LLAMA)
    rows = np.random.default_rng(1).integers(3, VOCAB, (2, 17)).astype(np.uint16)
    plain = CausalLM(eos_id=2, pad_id=1).loss_sum(model, CausalLM(eos_id=2, pad_id=1).collate(rows, [0, 1]))
    batch = compare_objective(
        model, CausalLM(eos_id=2, pad_id=1, z_loss=0.01), CausalLM(eos_id=2, pad_id=1, loss_chunk_tokens=5, z_loss=0.01),
        rows, [0, 1],
    )  # fmt: skip
    assert batch["z_loss"].item() > 0
    total = CausalLM(eos_id=2, pad_id=1, z_loss=0.01)
    with_z = total.collate(rows, [0, 1])
    assert total.loss_sum(model, with_z).item() == pytest.approx(
        plain.item() + with_z["z_loss"].item(), rel=1e-5
    )


def test_causal_lm_with_padding_equals_full_logits():
    model = model_from(MICRO_LLAMA)
    rows = np.random.default_rng(0).integers(3, VOCAB, (3, 17)).astype(np.uint16)
    rows[1, 12:] = 1  # padding: never a target, so the chunked head skips those rows
    rows[0, 6] = 2  # a document boundary
    full = CausalLM(eos_id=2, pad_id=1)
    batch = compare_objective(model, full, CausalLM(eos_id=2, pad_id=1, loss_chunk_tokens=5), rows, [0, 1, 2])
    assert batch["target_index"].shape[0] == int(batch["num_targets"]) == 3 * 16 - 5


def test_masked_lm_runs_the_head_on_masked_tokens_only(monkeypatch):
    model = model_from(REPO / "configs/model/tiny-bert.json", AutoModelForMaskedLM)
    rows = np.random.default_rng(1).integers(5, VOCAB, (4, 33)).astype(np.uint16)
    kwargs = {"mask_id": 4, "vocab_size": VOCAB, "special_ids": (0, 1, 2, 3, 4), "seed": 3}
    head_rows = []
    inner = head_loss.linear_cross_entropy_z
    monkeypatch.setattr(
        head_loss, "linear_cross_entropy_z", lambda h, *a: head_rows.append(h.shape[0]) or inner(h, *a)
    )
    batch = compare_objective(
        model, MaskedLM(**kwargs), MaskedLM(**kwargs, loss_chunk_tokens=16), rows, [0, 1, 2, 3]
    )
    assert model.get_output_embeddings().bias is not None  # BERT's decoder has a bias: covered
    assert head_rows == [int(batch["num_targets"])] and 0 < head_rows[0] < 4 * 32 / 3


def test_sft_equals_full_logits():
    model = model_from(MICRO_LLAMA)
    rng = np.random.default_rng(2)
    tokens = rng.integers(3, VOCAB, (2, 21))
    targets = np.zeros_like(tokens, dtype=bool)
    targets[:, 12:] = True  # response tokens only
    positions = np.tile(np.arange(21), (2, 1))
    arrays = {"tokens": tokens, "targets": targets, "positions": positions}
    compare_objective(
        model, SupervisedFineTuning(), SupervisedFineTuning(loss_chunk_tokens=4), arrays, [0, 1]
    )


def test_models_that_transform_logits_fall_back_to_full_logits():
    capped = model_from(
        {"model_type": "gemma2", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
         "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16},
        final_logit_softcapping=30.0,
    )  # fmt: skip
    assert fused_head(capped) is None
    batch = CausalLM(eos_id=None, loss_chunk_tokens=8).collate(np.arange(10, 30, dtype=np.uint16)[None], [0])
    expected = summed_cross_entropy(capped(input_ids=batch["input_ids"]).logits, batch["labels"])
    assert lm_loss_sum(capped, {"input_ids": batch["input_ids"]}, batch, 8).item() == pytest.approx(
        expected.item()
    )
    wrapped = model_from(MICRO_LLAMA)
    wrapped.lm_head = torch.nn.Sequential(wrapped.lm_head)  # e.g. a LoRA-wrapped head: not a plain Linear
    assert fused_head(wrapped) is None and fused_head(model_from(MICRO_LLAMA)) is not None
    compiled = model_from(MICRO_LLAMA)
    compiled.compile()  # in place, as DeepSpeed's engine.compile() does; compiles on first call
    assert fused_head(compiled) is None


def test_a_model_that_bypasses_its_head_is_an_error():
    model = model_from(MICRO_LLAMA)

    class Bypass(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def get_output_embeddings(self):
            return model.lm_head

        def forward(self, **inputs):  # logits from the weight directly, never through the head module
            hidden = model.model(**inputs).last_hidden_state
            return type("Out", (), {"logits": hidden @ model.lm_head.weight.t()})()

    batch = CausalLM(eos_id=None, loss_chunk_tokens=8).collate(np.arange(10, 30, dtype=np.uint16)[None], [0])
    with pytest.raises(RuntimeError, match="loss_chunk_tokens=0"):
        lm_loss_sum(Bypass(), {"input_ids": batch["input_ids"]}, batch, 8)
    assert "forward" not in vars(model.lm_head)  # the swap is undone even when the call fails


def test_ignored_rows_leave_the_target_index():
    """A row dropped after collate (a lost shard row, an eval batch's padding) loses its targets
    from every derived field, or the head would read ignored labels."""
    batch = CausalLM(eos_id=None, pad_id=1, loss_chunk_tokens=8).collate(
        np.arange(10, 43, dtype=np.uint16).reshape(3, 11), np.arange(3)
    )
    ignore_rows(batch, torch.tensor([False, True, False]))
    labels = batch["labels"].reshape(-1)
    assert batch["target_index"].tolist() == [*range(0, 10), *range(20, 30)]
    assert torch.all(labels[batch["target_index"]] != IGNORE_INDEX) and int(batch["num_targets"]) == 20


def _causal_rows():
    rows = np.random.default_rng(4).integers(3, VOCAB, (3, 17)).astype(np.uint16)
    rows[1, 12:] = 1  # padding: its targets are ignored, in that row only
    return rows


@pytest.mark.parametrize("chunk", [0, 5])
@pytest.mark.parametrize(
    "objective,auto,config,rows",
    [
        ("causal", AutoModelForCausalLM, MICRO_LLAMA, _causal_rows()),
        ("masked", AutoModelForMaskedLM, REPO / "configs/model/tiny-bert.json", None),
    ],
)
@torch.no_grad()
def test_row_losses_are_each_rows_own_loss(chunk, objective, auto, config, rows):
    """`row_losses` (per-set validation losses) gives each row the loss the row has alone, through
    the full-logits and the chunked head alike, and they sum to `loss_sum`."""
    model = model_from(config, auto)
    if objective == "causal":
        obj = CausalLM(eos_id=2, pad_id=1, loss_chunk_tokens=chunk)
    else:
        kwargs = {"mask_id": 4, "vocab_size": VOCAB, "special_ids": (0, 1, 2, 3, 4), "seed": 3}
        obj = MaskedLM(**kwargs, loss_chunk_tokens=chunk)
        rows = np.random.default_rng(5).integers(5, VOCAB, (4, 33)).astype(np.uint16)
    batch = obj.collate(rows, np.arange(len(rows)))
    got = obj.row_losses(model, batch)
    assert got.shape == (len(rows),) and got.dtype == torch.float32
    assert got.sum().item() == pytest.approx(obj.loss_sum(model, batch).item(), rel=1e-5)
    for i in range(len(rows)):  # each row alone: its own labels (the masked LM's masks kept)
        alone = {k: v[i : i + 1] for k, v in batch.items() if k in ("input_ids", "labels", "position_ids")}
        if chunk:
            alone["target_index"] = (alone["labels"].reshape(-1) != IGNORE_INDEX).nonzero().squeeze(1)
        ref = summed_cross_entropy(
            model(**{k: v for k, v in alone.items() if k != "labels" and k != "target_index"}).logits,
            alone["labels"],
        )
        assert got[i].item() == pytest.approx(ref.item(), rel=1e-5), i


@torch.no_grad()
def test_sft_row_losses_count_response_tokens_only():
    model = model_from(MICRO_LLAMA)
    tokens = np.random.default_rng(6).integers(3, VOCAB, (2, 21))
    targets = np.zeros_like(tokens, dtype=bool)
    targets[0, 12:], targets[1, 18:] = True, True
    arrays = {"tokens": tokens, "targets": targets, "positions": np.tile(np.arange(21), (2, 1))}
    for chunk in (0, 4):
        obj = SupervisedFineTuning(loss_chunk_tokens=chunk)
        batch = obj.collate(arrays, [0, 1])
        got = obj.row_losses(model, batch)
        assert got.sum().item() == pytest.approx(obj.loss_sum(model, batch).item(), rel=1e-5)
        only_first = {**batch, "labels": batch["labels"].clone()}
        ignore_rows(only_first, torch.tensor([False, True]))
        assert got[0].item() == pytest.approx(obj.loss_sum(model, only_first).item(), rel=1e-5)


@torch.no_grad()
def test_row_losses_when_every_position_is_a_target():
    model = model_from(MICRO_LLAMA)
    obj = CausalLM(eos_id=None, loss_chunk_tokens=7)
    batch = obj.collate(np.random.default_rng(7).integers(3, VOCAB, (3, 12)).astype(np.uint16), [0, 1, 2])
    assert batch["target_index"].shape[0] == 3 * 11  # no subset: rows come from the flat positions
    got = obj.row_losses(model, batch)
    ref = [
        summed_cross_entropy(model(input_ids=batch["input_ids"][i : i + 1]).logits, batch["labels"][i])
        for i in range(3)
    ]
    torch.testing.assert_close(got, torch.stack(ref), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk", [0, 5])
@pytest.mark.parametrize(
    "objective,auto,config,rows",
    [
        ("causal", AutoModelForCausalLM, MICRO_LLAMA, _causal_rows()),
        # every position a target (no padding): the head reads all rows, no target index
        ("causal_z", AutoModelForCausalLM, MICRO_LLAMA, np.random.default_rng(7).integers(3, VOCAB, (4, 17))),
        ("masked", AutoModelForMaskedLM, REPO / "configs/model/tiny-bert.json", None),
    ],
)
def test_a_mixture_sums_each_sources_training_loss_without_changing_the_loss(
    chunk, objective, auto, config, rows
):
    """`train_sources` > 1: batch["source_loss"] holds each source's summed token loss and target
    count (the rows' own losses, summed by source), through the chunked head and the full logits
    alike, detached, while the loss and every gradient stay those of the plain objective."""
    import dataclasses

    model = model_from(config, auto)
    if objective == "causal":
        plain = CausalLM(eos_id=2, pad_id=1, loss_chunk_tokens=chunk)
    elif objective == "causal_z":  # with z-loss: the sums are the cross-entropy's alone
        plain = CausalLM(eos_id=2, pad_id=None, loss_chunk_tokens=chunk, z_loss=0.01)
    else:
        kwargs = {"mask_id": 4, "vocab_size": VOCAB, "special_ids": (0, 1, 2, 3, 4), "seed": 3}
        plain = MaskedLM(**kwargs, loss_chunk_tokens=chunk)
        rows = np.random.default_rng(5).integers(5, VOCAB, (4, 33)).astype(np.uint16)
    mixture = dataclasses.replace(plain, train_sources=3)
    source = torch.tensor([2, 0, 2, 0][: len(rows)])  # source 1 has no row in this batch
    out = []
    for obj in (plain, mixture):
        model.zero_grad()
        batch = {**obj.collate(rows, np.arange(len(rows))), "source": source}
        loss = obj.loss_sum(model, batch)
        loss.backward()
        out.append((loss.item(), [p.grad.clone() for p in model.parameters() if p.grad is not None], batch))
    (ref_loss, ref_grads, plain_batch), (loss, got_grads, batch) = out
    assert "source_loss" not in plain_batch
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    for a, b in zip(got_grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    got = batch["source_loss"]
    assert got.shape == (3, 2) and not got.requires_grad
    with torch.no_grad():
        per_row = plain.row_losses(model, batch)
    targets = (batch["labels"] != IGNORE_INDEX).sum(1).float()
    for s in range(3):
        mine = source == s
        assert got[s, 0].item() == pytest.approx(per_row[mine].sum().item(), rel=1e-5, abs=1e-6), s
        assert got[s, 1].item() == targets[mine].sum().item()
    assert got[1].tolist() == [0.0, 0.0] and got[:, 1].sum().item() == batch["num_targets"].item()
