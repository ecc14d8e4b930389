"""Memory planning: model-state arithmetic against the ZeRO paper, activations against the tensors a
real forward saves, the choice ordering, and `ds-train plan` end to end."""

from __future__ import annotations

import json

import pytest
import torch

from ds_train.model.blocks import enable_activation_checkpointing
from ds_train.plan.choices import CHOICES, make_plan, overrides_for
from ds_train.plan.memory_estimate import (
    PRECISIONS,
    BucketSizes,
    HeadLoss,
    activation_bytes,
    buffer_bytes,
    loss_peak_bytes,
    model_states,
    saved_activation_bytes,
    with_grad_dtype,
)
from ds_train.plan.model_shape import ModelShape, shape_from_config
from tests.helpers import MICRO_LLAMA, TOKENIZER, run_cli, write_config
from tests.tensor_memory import LiveTensorBytes

PSI = 1_000_003  # odd, so no formula agrees by accident of divisibility

BF16, FP32 = PRECISIONS["bf16"], PRECISIONS["fp32"]


@pytest.mark.parametrize("n", [1, 2, 8, 64])
def test_mixed_precision_states_are_the_zero_paper_formulas(n):
    paper = {0: 16 * PSI, 1: 4 * PSI + 12 * PSI / n, 2: 2 * PSI + 14 * PSI / n, 3: 16 * PSI / n}
    for stage, expected in paper.items():
        states = model_states(PSI, stage, n, BF16)
        assert states.device == pytest.approx(expected, rel=1e-12), stage
        assert states.host == 0 and states.nvme == 0


@pytest.mark.parametrize("n", [1, 2, 8])
def test_fp32_states_keep_deepspeeds_master_copy_from_stage_1(n):
    # p = g = 4; stage 0 steps the fp32 weights directly (K = 8), ZeRO ≥ 1 clones an fp32 master (K = 12).
    expected = {0: 16 * PSI, 1: 8 * PSI + 12 * PSI / n, 2: 4 * PSI + 16 * PSI / n, 3: 20 * PSI / n}
    for stage, value in expected.items():
        assert model_states(PSI, stage, n, FP32).device == pytest.approx(value, rel=1e-12), stage


@pytest.mark.parametrize("n", [1, 2, 8])
def test_fp32_gradients_of_a_bf16_run_take_four_bytes_of_the_partition(n):
    """train.grad_dtype=fp32, as bench/bench_memory.py --grad-dtype fp32 measures it on DeepSpeed."""
    fp32_grads = with_grad_dtype(BF16, "fp32")
    assert fp32_grads.fp32_grads and fp32_grads.name == "bf16, fp32 grads"
    assert with_grad_dtype(BF16, "model") is BF16 and with_grad_dtype(FP32, "fp32") is FP32
    assert not with_grad_dtype(PRECISIONS["fp16"], "fp32").fp32_grads  # refused there by validation
    expected = {2: 2 * PSI + 16 * PSI / n, 3: 18 * PSI / n}
    for stage, value in expected.items():
        assert model_states(PSI, stage, n, fp32_grads).device == pytest.approx(value, rel=1e-12), stage
    shape = _shape()
    assert buffer_bytes(shape, 2, fp32_grads, BucketSizes()) == 2 * buffer_bytes(
        shape, 2, BF16, BucketSizes()
    )


def test_a_plan_with_fp32_gradients_offers_only_zero_2_and_3():
    plan = make_plan(
        _plan_shape(),
        world_size=2,
        precision=with_grad_dtype(BF16, "fp32"),
        micro_batch=2,
        seq_len=128,
        buckets=BucketSizes(reduce_bucket=10_000_000),
        device_memory=100 * 2**30,
    )
    assert {e.stage for e in plan.estimates} == {2, 3}
    assert plan.recommended.stage == 2


def test_states_split_into_params_grads_optimizer():
    s = model_states(PSI, 2, 4, BF16)
    assert (s.params, s.grads, s.optimizer) == pytest.approx((2 * PSI, 2 * PSI / 4, 12 * PSI / 4))
    s = model_states(PSI, 1, 4, BF16)
    assert s.grads == pytest.approx(2 * PSI)  # stage 1 keeps the whole accumulated gradient


def test_offload_moves_optimizer_and_params_to_the_host():
    n = 4
    opt = model_states(PSI, 3, n, BF16, offload_optimizer="cpu")
    assert opt.optimizer == 0 and opt.grads == 0
    assert opt.params == pytest.approx(2 * PSI / n)
    assert opt.host == pytest.approx(16 * PSI / n)  # master + moments + fp32 gradient partition
    both = model_states(PSI, 3, n, BF16, offload_optimizer="cpu", offload_param="cpu")
    assert both.device == 0 and both.host == pytest.approx(18 * PSI / n)
    nvme = model_states(PSI, 3, n, BF16, offload_optimizer="nvme", offload_param="nvme")
    assert nvme.device == 0 and nvme.nvme == pytest.approx((12 + 2) * PSI / n)
    z2 = model_states(PSI, 2, n, BF16, offload_optimizer="cpu")
    assert z2.device == pytest.approx(2 * PSI)  # only the 16-bit weights stay on the device


def test_impossible_combinations_are_refused():
    with pytest.raises(ValueError):
        model_states(PSI, 0, 2, BF16, offload_optimizer="cpu")
    with pytest.raises(ValueError):
        model_states(PSI, 2, 2, BF16, offload_param="cpu")
    with pytest.raises(ValueError):
        model_states(PSI, 4, 2, BF16)


def _shape(**kw) -> ModelShape:
    base = dict(
        params=PSI, layers=4, hidden=256, heads=4, kv_dim=128, intermediate=704, vocab=512,
        gated_mlp=True, largest_layer_params=200_000,
    )  # fmt: skip
    return ModelShape(**{**base, **kw})


def test_buffers_follow_the_configured_buckets():
    shape, b = _shape(), BucketSizes(reduce_bucket=1000, overlap_comm=None, prefetch_bucket=300)
    assert buffer_bytes(shape, 0, BF16, b) == 0
    assert buffer_bytes(shape, 2, BF16, b) == 1000 * 2
    assert buffer_bytes(shape, 2, BF16, BucketSizes(1000, True, 300)) == 2 * 1000 * 2
    assert buffer_bytes(shape, 3, FP32, b) == 1000 * 4 + (300 + 200_000) * 4


def _micro_model(dtype, *, vocab=300, checkpoint_layers=0, attention="sdpa"):
    """A 3-layer Llama (hidden 128), in training mode, its first `checkpoint_layers` blocks
    checkpointed, and its shape for the estimate."""
    from transformers import AutoConfig, AutoModelForCausalLM

    raw = json.loads(MICRO_LLAMA.read_text())
    raw.pop("model_type")
    raw.update(
        hidden_size=128, intermediate_size=352, num_attention_heads=4, num_hidden_layers=3, vocab_size=vocab
    )
    cfg = AutoConfig.for_model("llama", **raw)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=attention, dtype=dtype)
    model.config.use_cache = False
    if checkpoint_layers:
        enable_activation_checkpointing(model, checkpoint_layers)
    return model.train(), shape_from_config(cfg)


def _loss(model, x, chunk):
    """ds-train's loss: from full logits, or through the chunked head loss when `chunk` > 0."""
    from ds_train.objectives.base import summed_cross_entropy
    from ds_train.objectives.head_loss import lm_loss_sum

    if chunk:
        return lm_loss_sum(model, {"input_ids": x}, {"labels": x}, chunk)
    return summed_cross_entropy(model(input_ids=x).logits, x)


def _measure_saved_bytes(
    dtype, *, checkpoint_layers=0, attention="sdpa", batch=2, seq=64, vocab=300, chunk=0
) -> tuple[float, ModelShape]:
    """Bytes of the tensors autograd saves in one forward + ds-train's loss (weights excluded)."""
    model, shape = _micro_model(dtype, vocab=vocab, checkpoint_layers=checkpoint_layers, attention=attention)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    x = torch.randint(0, vocab, (batch, seq))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _loss(model, x, chunk)
    return sum(saved.values()), shape


@pytest.mark.parametrize(
    "dtype,checkpoint_layers,attention",
    [
        (torch.float32, 0, "sdpa"),
        (torch.bfloat16, 0, "sdpa"),
        (torch.bfloat16, 3, "sdpa"),
        (torch.bfloat16, 1, "sdpa"),
        (torch.bfloat16, 0, "eager"),
    ],
)
def test_activation_formula_matches_the_tensors_a_forward_saves(dtype, checkpoint_layers, attention):
    measured, shape = _measure_saved_bytes(dtype, checkpoint_layers=checkpoint_layers, attention=attention)
    precision = BF16 if dtype is torch.bfloat16 else FP32
    estimated = saved_activation_bytes(
        shape, 2, 64, precision, checkpoint_layers=checkpoint_layers, attention=attention
    )
    assert estimated == pytest.approx(measured, rel=0.10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", [0, 32])
@pytest.mark.parametrize(
    "checkpoint_layers,vocab",
    # none, all 3 or the first 1 or 2 blocks; at vocab 300 a recomputed block sets the peak
    [(0, 3000), (3, 3000), (3, 300), (1, 300), (2, 300)],
)
def test_activation_peak_matches_the_live_tensors_of_a_step(dtype, chunk, checkpoint_layers, vocab):
    """The whole forward + backward's peak of live tensors (activations, the loss's logits or chunks,
    gradients in flight; parameter gradients, model states in the plan, accumulate in place)."""
    model, shape = _micro_model(dtype, vocab=vocab, checkpoint_layers=checkpoint_layers)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    x = torch.randint(0, vocab, (2, 96))
    with LiveTensorBytes() as meter:
        _loss(model, x, chunk).backward()
    precision = BF16 if dtype is torch.bfloat16 else FP32
    estimated = activation_bytes(
        shape, 2, 96, precision, checkpoint_layers=checkpoint_layers, loss=HeadLoss(chunk_tokens=chunk)
    )
    assert estimated == pytest.approx(meter.peak, rel=0.08)


def test_checkpointing_and_peak_terms_move_activations_the_right_way():
    shape = _shape(layers=24)
    tokens = 4 * 1024
    off = activation_bytes(shape, 4, 1024, BF16)
    on = activation_bytes(shape, 4, 1024, BF16, checkpoint_layers=24)
    assert on < off / 5
    assert activation_bytes(shape, 8, 1024, BF16) == pytest.approx(2 * off)  # linear in the batch
    saved = saved_activation_bytes(shape, 4, 1024, BF16)
    assert off - saved == pytest.approx(tokens * 8 * shape.vocab)  # two fp32 logit gradients
    saved_on = saved_activation_bytes(shape, 4, 1024, BF16, checkpoint_layers=24)
    one_layer = (saved - saved_on) / 24 + tokens * 2 * shape.hidden  # its input is kept either way
    in_flight = tokens * 2 * shape.intermediate  # the gradient of its MLP activation
    # the larger moment: the loss's backward, or one layer recomputed once the log-softmax is freed
    at_loss = saved_on + tokens * 8 * shape.vocab
    at_layer = saved_on - tokens * 4 * shape.vocab + one_layer + in_flight
    assert on == pytest.approx(max(at_loss, at_layer), rel=1e-9)
    small_vocab = _shape(layers=24, vocab=64)
    assert activation_bytes(small_vocab, 4, 1024, BF16, checkpoint_layers=24) > saved_activation_bytes(
        small_vocab, 4, 1024, BF16, checkpoint_layers=24
    ) + loss_peak_bytes(small_vocab, 4, 1024, BF16)  # there the recomputed layer sets the peak


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_loss_formula_matches_the_tensors_a_forward_saves(dtype):
    # 192 tokens against hidden 128 and a vocabulary of 3000, so that the per-token logits
    # (4V·tokens) and the once-per-batch weight-gradient accumulator (4V·h) cannot agree by accident
    precision = BF16 if dtype is torch.bfloat16 else FP32
    full, shape = _measure_saved_bytes(dtype, seq=96, vocab=3000)
    chunked, _ = _measure_saved_bytes(dtype, seq=96, vocab=3000, chunk=32)
    estimated = saved_activation_bytes(shape, 2, 96, precision, loss=HeadLoss(chunk_tokens=32))
    assert estimated == pytest.approx(chunked, rel=0.10)
    # what the chunked loss changes, to the byte: no fp32 log-softmax per token, one accumulator
    estimated_full = saved_activation_bytes(shape, 2, 96, precision)
    assert estimated_full - estimated == pytest.approx(full - chunked, rel=1e-3)
    assert full - chunked == pytest.approx(4 * 3000 * (2 * 96 - 128), rel=1e-3)


def test_chunked_loss_peak_is_one_chunk_not_every_token():
    shape = _shape(layers=16, hidden=2048, vocab=128_256)
    tokens = 8 * 4096
    full = loss_peak_bytes(shape, 8, 4096, BF16)
    assert full == tokens * 8 * shape.vocab  # the loss's and the log-softmax's fp32 gradients
    chunked = loss_peak_bytes(shape, 8, 4096, BF16, HeadLoss(chunk_tokens=1024))
    assert chunked < full / 20
    # bf16: the chunk's fp32 gradient, its bf16 copy and the [V, h] weight-gradient product
    assert chunked == 1024 * shape.vocab * 6 + 2 * shape.vocab * shape.hidden + 24 * 1024
    fp32 = loss_peak_bytes(shape, 8, 4096, FP32, HeadLoss(chunk_tokens=1024))
    # one fp32 chunk worked on in place; addmm_ into the accumulator: no product temporary
    assert fp32 == 1024 * shape.vocab * 4 + 24 * 1024
    # a chunk larger than the batch's targets is the whole batch; masked LM has fewer targets
    assert loss_peak_bytes(shape, 1, 512, FP32, HeadLoss(chunk_tokens=4096)) == 512 * (shape.vocab * 4 + 24)
    masked = HeadLoss(chunk_tokens=100_000, target_fraction=0.15)
    assert loss_peak_bytes(shape, 1, 1000, FP32, masked) == 150 * (shape.vocab * 4 + 24)
    assert saved_activation_bytes(shape, 8, 4096, BF16, loss=masked) < saved_activation_bytes(
        shape, 8, 4096, BF16, loss=HeadLoss(chunk_tokens=100_000)
    )


def test_shape_counts_parameters_like_the_real_model():
    from transformers import AutoConfig, AutoModelForCausalLM

    raw = json.loads(MICRO_LLAMA.read_text())
    model_type = raw.pop("model_type")
    for tied in (False, True):
        cfg = AutoConfig.for_model(model_type, **{**raw, "tie_word_embeddings": tied, "vocab_size": 300})
        model = AutoModelForCausalLM.from_config(cfg)
        shape = shape_from_config(cfg)
        assert shape.params == sum(p.numel() for p in model.parameters())  # tied weights once
        assert shape.kv_dim == raw["num_key_value_heads"] * raw["hidden_size"] // raw["num_attention_heads"]
        assert shape.gated_mlp


def _plan_shape() -> ModelShape:
    return _shape(params=50_000_000, layers=8, hidden=512, intermediate=1408, kv_dim=256, vocab=4096)


def _plan(device_gib: float | None, **kw):
    return make_plan(
        _plan_shape(),
        world_size=kw.get("world_size", 4),
        precision=BF16,
        micro_batch=8,
        seq_len=2048,
        buckets=BucketSizes(reduce_bucket=10_000_000),
        device_memory=None if device_gib is None else device_gib * 2**30,
        headroom=0.1,
    )


@pytest.mark.parametrize("device_gib", [0.5, 1.5, 3, 6, 100])
def test_recommendation_is_the_first_choice_that_fits(device_gib):
    plan = _plan(device_gib)
    assert len(plan.estimates) == len(CHOICES)
    fitting = [e for e in plan.estimates if e.device <= device_gib * 2**30 * 0.9]
    assert plan.recommended is (fitting[0] if fitting else None)
    if plan.recommended is not None:
        index = plan.estimates.index(plan.recommended)
        assert all(not plan.fits(e) for e in plan.estimates[:index])


def test_recommendation_moves_down_the_list_as_memory_shrinks():
    # each pick's place in its own plan's list (a pick with fewer checkpointed blocks is another
    # Estimate than the plan without a device memory holds)
    order = [(plan := _plan(g)).estimates.index(plan.recommended) for g in (100, 4, 1.5)]
    picks = [_plan(g).recommended for g in (100, 4, 1.5)]
    assert order == sorted(order) and len(set(order)) == 3
    assert picks[0].stage == 0 and not picks[0].checkpoint_layers
    assert _plan(None).recommended is None


def test_overrides_select_the_choice():
    e = next(e for e in _plan(None).estimates if e.offload_param == "cpu" and e.checkpoint_layers)
    assert overrides_for(e, 8) == (
        "zero.stage=3 zero.offload_optimizer=cpu zero.offload_param=cpu model.activation_checkpointing=true "
        "model.activation_checkpointing_layers=0"  # all 8 blocks
    )
    e = next(e for e in _plan(None).estimates if e.stage == 0 and not e.checkpoint_layers)
    assert overrides_for(e, 8) == (
        "zero.stage=0 zero.offload_optimizer=none zero.offload_param=none model.activation_checkpointing=false "
        "model.activation_checkpointing_layers=0"
    )


@pytest.mark.parametrize("preset", ["stage3-offload-all", "stage2-offload-optimizer", "stage0"])
@pytest.mark.parametrize("device_gib", [None, 100, 4, 1.5, 0.5])
@pytest.mark.parametrize("compiled,nvme_path", [(False, True), (True, False)])
def test_printed_overrides_pass_validation_over_any_preset(
    tmp_path, shards, preset, device_gib, compiled, nvme_path
):
    # `plan` printed `zero.stage=0 model.activation_checkpointing=false` for a config using the
    # stage3-offload-all preset, and the offload it left in place needs stage 3; a ZeRO-3 choice
    # for a compiled model, or an NVMe one without zero.nvme_path, failed validation too
    from ds_train.config import load_config, validate
    from ds_train.plan.choices import NVME_PATH_PLACEHOLDER, RunSettings
    from tests.helpers import base_config

    raw = base_config(tmp_path / "run", shards)
    raw["zero"] = {"preset": preset, **({"nvme_path": str(tmp_path)} if nvme_path else {})}
    raw["model"].update(activation_checkpointing=True, activation_checkpointing_layers=1, compile=compiled)
    cfg_file = write_config(tmp_path / "run.yaml", raw)
    run = RunSettings(compile=compiled, nvme_path=str(tmp_path) if nvme_path else None)
    plan = _plan(device_gib)
    for e in [*plan.estimates, *([plan.recommended] if plan.recommended else [])]:
        overrides = overrides_for(e, 8, run)
        # the placeholder is the one thing the user fills in (the output says so)
        cfg = load_config(cfg_file, overrides.replace(NVME_PATH_PLACEHOLDER, str(tmp_path)).split())
        validate(cfg)
        assert cfg.model.compile == (compiled and e.stage < 3)
        assert (cfg.zero.stage, cfg.zero.offload_optimizer, cfg.zero.offload_param) == (
            e.stage,
            e.offload_optimizer,
            e.offload_param,
        )


def test_the_fewest_checkpointed_blocks_that_fit_are_recommended():
    full, none = _plan(None).estimates[4], _plan(None).estimates[0]  # ZeRO-0 with and without
    assert full.checkpoint_layers == 8 and none.checkpoint_layers == 0
    # room for about half the blocks' activations: between what all and none of them need
    device_gib = (full.device + none.device) / 2 / 0.9 / 2**30
    plan = _plan(device_gib)
    pick = plan.recommended
    assert pick.stage == 0 and 0 < pick.checkpoint_layers < 8
    assert plan.fits(pick)
    one_fewer = estimate_with(pick.checkpoint_layers - 1)
    assert not plan.fits(one_fewer)  # the fewest: one block fewer does not fit
    assert overrides_for(pick, 8).endswith(f"model.activation_checkpointing_layers={pick.checkpoint_layers}")


def estimate_with(checkpoint_layers: int):
    from ds_train.plan.memory_estimate import estimate

    return estimate(
        _plan_shape(), stage=0, world_size=4, precision=BF16, micro_batch=8, seq_len=2048,
        checkpoint_layers=checkpoint_layers, buckets=BucketSizes(reduce_bucket=10_000_000),
    )  # fmt: skip


def test_cli_plan_prints_every_choice_and_the_recommendation(tmp_path):
    cfg = write_config(
        tmp_path / "run.yaml",
        {
            "run": {"output_dir": str(tmp_path / "run")},
            "model": {"config": str(MICRO_LLAMA), "tokenizer": str(TOKENIZER)},
            "data": {"train": str(tmp_path / "nowhere")},
            "train": {"max_steps": 1, "global_batch_size": 8, "micro_batch_size": 2, "precision": "bf16"},
        },
    )
    out = run_cli(["plan", cfg, "--world-size", "2", "--device-memory", "1GB", "--seq-len", "32"]).stdout
    rows = [line for line in out.splitlines() if line.startswith("ZeRO-")]
    assert len(rows) == len(CHOICES)
    assert "recommended (fastest that fits in 0.9 GiB usable): ZeRO-0, activation checkpointing off" in out
    assert "overrides: zero.stage=0 zero.offload_optimizer=none zero.offload_param=none " in out
    assert "loss in chunks of 1024 tokens" in out
    # vocab 4096 ≫ hidden 32: full logits dominate the activations, chunks of them do not
    long = ["--seq-len", "4096", "--micro-batch", "8"]
    chunked = run_cli(["plan", cfg, *long]).stdout
    full = run_cli(["plan", cfg, "model.loss_chunk_tokens=0", *long]).stdout
    assert "loss from full logits" in full
    assert _activation_column(full) > 4 * _activation_column(chunked) > 0
    fp32_grads = run_cli(["plan", cfg, "train.grad_dtype=fp32", "zero.stage=2", "--seq-len", "32"]).stdout
    assert "bf16, fp32 grads" in fp32_grads
    stages = {line.split()[0].rstrip(",") for line in fp32_grads.splitlines() if line.startswith("ZeRO-")}
    assert stages == {"ZeRO-2", "ZeRO-3"}
    no_seq = run_cli(["plan", cfg, "--world-size", "2"], check=False)
    assert no_seq.returncode == 2 and "--seq-len" in no_seq.stderr


def _activation_column(plan_output: str) -> float:
    """The 'activ.' column of the first row of `ds-train plan`'s table, in GiB."""
    lines = plan_output.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("choice"))
    assert lines[header + 1].startswith("ZeRO-0 ")  # a one-word label: columns line up with the header
    return float(lines[header + 1].split()[lines[header].split().index("activ.")])


def test_parse_size():
    from ds_train.cli.plan import parse_size

    assert parse_size("80GB") == parse_size("80GiB") == parse_size("80g") == 80 * 2**30
    assert parse_size("512MiB") == 512 * 2**20
    assert parse_size("24e9") == 24e9
    with pytest.raises(Exception, match="not a memory size"):
        parse_size("eighty")


def test_nvme_swap_buffers_count_as_host_memory():
    """DeepSpeed stages NVMe swaps through pinned host buffers: the plan's host column counts them
    (it showed only the fp32 gradient partition), with DeepSpeed's own defaults."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    from deepspeed.runtime.zero.offload_config import (
        DeepSpeedZeroOffloadOptimizerConfig,
        DeepSpeedZeroOffloadParamConfig,
    )

    from ds_train.plan.memory_estimate import (
        OPTIMIZER_SWAP_BUFFERS,
        PARAM_SWAP_BUFFERS,
        SUB_GROUP_SIZE,
        BucketSizes,
        estimate,
    )

    assert DeepSpeedZeroOffloadOptimizerConfig().buffer_count == OPTIMIZER_SWAP_BUFFERS
    assert DeepSpeedZeroOffloadParamConfig().buffer_count == PARAM_SWAP_BUFFERS
    assert DeepSpeedZeroConfig().sub_group_size == SUB_GROUP_SIZE
    shape, n = _shape(), 4

    def host(buckets=None, opt="nvme", par="nvme"):
        kw = dict(stage=3, world_size=n, precision=BF16, micro_batch=1, seq_len=64, checkpoint_layers=0)
        return estimate(shape, offload_optimizer=opt, offload_param=par, buckets=buckets, **kw).host

    # whole partition per optimizer sub-group: 4 fp32 buffers of Ψ/N, beside the gradient partition
    params = PARAM_SWAP_BUFFERS * -(-shape.largest_param // n) * 2
    assert host() == pytest.approx(4 * shape.params / n + 4 * 4 * shape.params / n + params)
    assert host(opt="cpu", par="cpu") < host()  # with default sub-groups NVMe takes more pinned memory
    small = host(BucketSizes(sub_group_size=1000))
    assert small < host() and small == pytest.approx(
        4 * shape.params / n + 4 * 4 * (999 + -(-shape.largest_param // n)) + params
    )
