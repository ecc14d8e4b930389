"""Stage-independent initialisation and PaLM FLOPs."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from ds_train.model.flops import flops_per_token, matmul_params
from ds_train.model.init import initialize_weights
from tests.helpers import MICRO_LLAMA


def _model(seed_for_construction: int):
    raw = json.loads(MICRO_LLAMA.read_text())
    cfg = AutoConfig.for_model(raw.pop("model_type"), vocab_size=256, **raw)
    torch.manual_seed(seed_for_construction)  # construction order/seed must not matter
    return AutoModelForCausalLM.from_config(cfg)


def test_weights_depend_on_run_seed_not_on_construction():
    a, b, c = _model(1), _model(2), _model(3)
    initialize_weights(a, seed=7, rank=0)
    initialize_weights(b, seed=7, rank=0)
    initialize_weights(c, seed=8, rank=0)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
        if pa.ndim == 2:
            assert not torch.equal(pa, pc), name
    emb = a.get_input_embeddings().weight
    assert abs(emb.std().item() - a.config.initializer_range) < 0.005
    norm = a.model.norm.weight
    assert torch.equal(norm, torch.ones_like(norm))


def test_fresh_model_loss_is_ln_vocab():
    m = _model(0)
    initialize_weights(m, seed=1, rank=0)
    ids = torch.randint(0, 256, (2, 16))
    loss = m(input_ids=ids, labels=ids).loss.item()
    assert abs(loss - math.log(256)) / math.log(256) < 0.05


def test_palm_flops_formula():
    m = _model(0)
    c = m.config
    total = sum(p.numel() for p in m.parameters())
    n = total - m.get_input_embeddings().weight.numel()  # untied head counts, input embedding not
    assert matmul_params(m) == n
    assert (
        flops_per_token(m, 128)
        == 6 * n
        + 12 * c.num_hidden_layers * c.num_attention_heads * (c.hidden_size // c.num_attention_heads) * 128
    )


def test_checkpointing_the_first_blocks_recomputes_only_them_and_keeps_the_gradients():
    """model.activation_checkpointing_layers=K: blocks 0..K-1 run their MLP twice (once more in
    backward), the rest once, and the gradients are those of the model without checkpointing."""
    from ds_train.config import ConfigError
    from ds_train.model.blocks import enable_activation_checkpointing

    def grads_and_forwards(layers):
        m = _model(0)
        initialize_weights(m, seed=3, rank=0)
        m.config.use_cache = False
        if layers is not None:
            enable_activation_checkpointing(m, layers)
        m.train()
        calls = [0] * len(m.model.layers)
        # inside the block, where a recompute runs again; a pre-hook, since the recompute stops
        # once it has regenerated the last saved tensor (torch's early stop), before the MLP returns
        for i, block in enumerate(m.model.layers):
            block.mlp.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
        x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
        m(input_ids=x, labels=x).loss.backward()
        return {n: p.grad for n, p in m.named_parameters()}, calls

    blocks = _model(0).config.num_hidden_layers
    assert blocks >= 2
    plain, plain_calls = grads_and_forwards(None)
    first, first_calls = grads_and_forwards(1)
    every, every_calls = grads_and_forwards(0)  # 0: all blocks
    assert plain_calls == [1] * blocks
    assert first_calls == [2] + [1] * (blocks - 1)
    assert every_calls == [2] * blocks
    for name, g in plain.items():
        torch.testing.assert_close(first[name], g, rtol=0, atol=0, msg=name)
        torch.testing.assert_close(every[name], g, rtol=0, atol=0, msg=name)
    with pytest.raises(ConfigError, match=f"has {blocks} checkpointable blocks"):
        enable_activation_checkpointing(_model(0), blocks + 1)


def _hf_config(name: str):
    raw = json.loads((MICRO_LLAMA.parent / name).read_text())
    return AutoConfig.for_model(raw.pop("model_type"), vocab_size=256, **raw)


@pytest.mark.parametrize(("name", "cls"), [("tiny-gpt2.json", "causal"), ("tiny-bert.json", "masked")])
def test_building_without_transformers_init_gives_the_same_weights(name, cls):
    """model_without_init skips transformers' two draws at construction: after initialize_weights
    the weights are bit-identical to a model built the usual way, and tied weights stay tied."""
    from transformers import AutoModelForMaskedLM

    from ds_train.model.build import model_without_init

    model_cls = AutoModelForCausalLM if cls == "causal" else AutoModelForMaskedLM
    config = _hf_config(name)
    usual = model_cls.from_config(config)
    quick = model_without_init(model_cls, config)
    for m in (usual, quick):
        initialize_weights(m, seed=5, rank=0)
    assert list(usual.state_dict()) == list(quick.state_dict())
    for (key, a), b in zip(usual.state_dict().items(), quick.state_dict().values()):
        assert torch.equal(a, b), key
    if config.tie_word_embeddings:
        assert quick.get_output_embeddings().weight is quick.get_input_embeddings().weight


@pytest.mark.parametrize("model_type", ["gpt2", "gpt_bigcode", "llama", "bert"])
def test_each_weight_has_the_spread_transformers_gives_it(model_type):
    """Drawn module by module, GPT-2's and StarCoder's output projections missed the scaled
    residual init their attention/MLP blocks (which own no parameter) give them: std 0.02 instead
    of 0.02/√(2·8) = 0.005 (pretraining audit). Every weight's spread now matches transformers'."""
    from transformers import AutoModelForMaskedLM

    shape = {"n_layer": 8, "n_embd": 64, "n_head": 4, "n_positions": 64}
    if model_type in ("llama", "bert"):
        shape = {
            "num_hidden_layers": 8,
            "hidden_size": 64,
            "num_attention_heads": 4,
            "intermediate_size": 128,
        }
    config = AutoConfig.for_model(model_type, vocab_size=256, bos_token_id=0, eos_token_id=0, **shape)
    model_cls = AutoModelForMaskedLM if model_type == "bert" else AutoModelForCausalLM
    torch.manual_seed(0)
    usual, ours = model_cls.from_config(config), model_cls.from_config(config)
    initialize_weights(ours, seed=3, rank=0)
    with torch.no_grad():
        spreads = {
            name: (float(a.std()), float(b.std()))
            for (name, a), b in zip(usual.named_parameters(), ours.parameters())
            if a.numel() >= 1024 and float(a.std()) > 0
        }
    assert spreads and all(abs(ours_ / usual_ - 1) < 0.15 for usual_, ours_ in spreads.values()), spreads
    if model_type == "gpt2":
        assert spreads["transformer.h.0.attn.c_proj.weight"][1] == pytest.approx(
            0.02 / math.sqrt(16), rel=0.15
        )


def test_a_parameter_init_weights_skips_is_reset_not_left_uninitialised(monkeypatch, caplog):
    """Built without init, a parameter `_init_weights` does not draw would hold uninitialised
    memory: it gets torch's reset_parameters() under the module's seed (the same on every
    rank and stage), and a module with nothing to reset it stops the run."""
    from ds_train.model.build import model_without_init

    config = _hf_config("micro-llama.json")
    init = type(AutoModelForCausalLM.from_config(config))._init_weights

    def skip_the_head(self, module):
        if module is not self.lm_head:
            init(self, module)

    cls = AutoModelForCausalLM
    a, b = model_without_init(cls, config), model_without_init(cls, config)
    for m in (a, b):
        monkeypatch.setattr(type(m), "_init_weights", skip_the_head)
        initialize_weights(m, seed=5, rank=0)
    head = a.lm_head.weight
    assert torch.isfinite(head).all() and head.std() > 0
    assert torch.equal(head, b.lm_head.weight)  # seeded per module: reproducible
    assert "lm_head.weight" in caplog.text

    def skip_the_norm(self, module):
        if module is not self.model.norm:
            init(self, module)

    c = model_without_init(cls, config)
    monkeypatch.setattr(type(c), "_init_weights", skip_the_norm)
    with pytest.raises(RuntimeError, match="model.norm.weight"):
        initialize_weights(c, seed=5, rank=0)


def test_a_resumed_run_builds_its_model_without_drawing(monkeypatch):
    from ds_train.config.schema import ModelSection
    from ds_train.model import build

    drawn = []
    monkeypatch.setattr(
        build, "initialize_weights", lambda model, seed, rank, residual=None: drawn.append(seed)
    )
    section = ModelSection(config=str(MICRO_LLAMA))
    build.build_model(section, _hf_config("micro-llama.json"), seed=1, rank=0, fresh_weights=False)
    assert drawn == []
    build.build_model(section, _hf_config("micro-llama.json"), seed=1, rank=0)
    assert drawn == [1]


@pytest.mark.parametrize(
    ("model_type", "limit", "refused"),
    [("gpt2", {"n_positions": 64}, True), ("bert", {"max_position_embeddings": 64}, True),
     ("opt", {"max_position_embeddings": 64}, True), ("llama", {"max_position_embeddings": 64}, False),
     ("bloom", {}, False)],
)  # fmt: skip
def test_rows_longer_than_learned_positions_are_refused_rotary_ones_warned(
    model_type, limit, refused, caplog
):
    from ds_train.config import ConfigError
    from ds_train.model.build import check_positions

    config = AutoConfig.for_model(model_type, **limit)
    check_positions(config, 64, "finetune.seq_len")  # at the limit: fine
    if refused:
        with pytest.raises(ConfigError, match="finetune.seq_len is 65 tokens but the model has 64 learned"):
            check_positions(config, 65, "finetune.seq_len")
    else:
        check_positions(config, 65, "finetune.seq_len")
        assert ("extrapolated" in caplog.text) == (model_type == "llama")


def test_residual_init_scales_only_the_residual_projections():
    """model.residual_init: the same draws, with each block's o_proj and down_proj weights times
    1/√(2L) (scaled) or 1/√(2(l + 1)) (depth); every other weight bit-identical to default."""
    from ds_train.model.init import residual_scale

    default, scaled, depth = _model(0), _model(0), _model(0)
    names = [n for n, _ in default.named_modules()]
    layers = default.config.num_hidden_layers
    assert layers >= 2
    initialize_weights(default, seed=7, rank=0)
    initialize_weights(scaled, seed=7, rank=0, residual=residual_scale("scaled", names))
    initialize_weights(depth, seed=7, rank=0, residual=residual_scale("depth", names))
    residual = 0
    for (name, d), s, h in zip(default.named_parameters(), scaled.parameters(), depth.parameters()):
        block = name.split(".")[2] if name.startswith("model.layers.") else None
        if name.endswith(("self_attn.o_proj.weight", "mlp.down_proj.weight")):
            residual += 1
            assert torch.allclose(s, d / math.sqrt(2 * layers), rtol=1e-6, atol=0), name
            assert torch.allclose(h, d / math.sqrt(2 * (int(block) + 1)), rtol=1e-6, atol=0), name
        else:
            assert torch.equal(s, d) and torch.equal(h, d), name
    assert residual == 2 * layers
    assert residual_scale("default", names) is None


def test_residual_init_is_refused_where_it_cannot_apply(tmp_path):
    from ds_train.config import ConfigError
    from ds_train.config.schema import ModelSection
    from ds_train.model.build import check_residual_init

    gpt2 = AutoConfig.for_model("gpt2", n_layer=2, n_embd=16, n_head=2)
    # a mixture of experts matches o_proj but not its experts' down projections: half would be scaled
    mixtral = AutoConfig.for_model(
        "mixtral", num_hidden_layers=2, hidden_size=16, intermediate_size=32, num_attention_heads=2,
        num_key_value_heads=1, num_local_experts=2, vocab_size=64,
    )  # fmt: skip
    for other in (gpt2, mixtral):
        with pytest.raises(ConfigError, match="model.residual_init=scaled knows Llama-style blocks"):
            check_residual_init(ModelSection(config="x.json", residual_init="scaled"), other)
    check_residual_init(ModelSection(config="x.json"), gpt2)  # default: anything goes
    raw = json.loads(MICRO_LLAMA.read_text())
    llama = AutoConfig.for_model(raw.pop("model_type"), vocab_size=256, **raw)
    check_residual_init(ModelSection(config="x.json", residual_init="depth"), llama)
    with pytest.raises(ConfigError, match="model.init_from's weights are already trained"):
        check_residual_init(ModelSection(init_from=str(tmp_path), residual_init="depth"), llama)


def test_a_fresh_model_is_built_with_the_residual_init(tmp_path, shards):
    from ds_train.config import load_config
    from ds_train.model.build import build_model
    from ds_train.train.pretrain import preflight
    from tests.helpers import base_config, write_config

    cfg = load_config(
        write_config(tmp_path / "c.yaml", base_config(tmp_path / "run", shards)),
        ["model.residual_init=scaled"],
    )
    pre = preflight(cfg)
    model = build_model(cfg.model, pre.hf_config, seed=7, rank=0)
    layers = pre.hf_config.num_hidden_layers
    std = torch.cat([m.mlp.down_proj.weight.flatten() for m in model.model.layers]).std().item()
    expected = pre.hf_config.initializer_range / math.sqrt(2 * layers)
    assert abs(std - expected) / expected < 0.1
