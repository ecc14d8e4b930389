"""train.per_layer_norms_every's grouping of parameters into layers, its arithmetic on one process (the
ZeRO stages: tests/distributed/test_per_layer_norms.py), and its config check."""

from __future__ import annotations

import pytest
import torch

from ds_train.train.per_layer_norms import PerLayerNorms, layer_group


@pytest.mark.parametrize(
    ("name", "group"),
    [
        ("model.layers.3.self_attn.q_proj.weight", "model.layers.3"),
        ("model.layers.12.mlp.down_proj.weight", "model.layers.12"),
        ("model.embed_tokens.weight", "model.embed_tokens"),
        ("model.norm.weight", "model.norm"),
        ("lm_head.weight", "lm_head"),
        ("bert.encoder.layer.0.attention.self.query.bias", "bert.encoder.layer.0"),
        ("bert.embeddings.word_embeddings.weight", "bert.embeddings.word_embeddings"),
        # peft's wrapper: the same group as without LoRA
        ("base_model.model.model.layers.3.self_attn.q_proj.lora_A.default.weight", "model.layers.3"),
        ("bias", "bias"),
    ],
)
def test_each_block_is_one_group_and_every_other_module_its_own(name, group):
    assert layer_group(name) == group


class _Stage0Engine:
    def fp16_enabled(self) -> bool:
        return False


def test_norms_per_group_of_full_gradients_on_one_rank():
    torch.manual_seed(0)
    model = torch.nn.ModuleDict(
        {
            "embed": torch.nn.Embedding(5, 3),
            "layers": torch.nn.ModuleList([torch.nn.Linear(3, 3) for _ in range(2)]),
        }
    )
    model["embed"].weight.requires_grad_(False)  # frozen: not a group
    x = model["embed"](torch.tensor([1, 2]))
    for layer in model["layers"]:
        x = layer(x)
    x.sum().backward()
    norms = PerLayerNorms(2, model, rank=0, device=torch.device("cpu"))
    assert norms.due(4) and not norms.due(3)
    assert norms.take() == {}  # nothing measured yet
    norms.measure(_Stage0Engine())
    got = norms.take()
    assert list(got["layer_grad_norm"]) == ["layers.0", "layers.1"]
    for i in range(2):
        layer = model["layers"][i]
        grad = torch.cat([layer.weight.grad.flatten(), layer.bias.grad.flatten()]).norm()
        weight = torch.cat([layer.weight.flatten(), layer.bias.flatten()]).detach().norm()
        assert got["layer_grad_norm"][f"layers.{i}"] == pytest.approx(float(grad), rel=1e-6)
        assert got["layer_weight_norm"][f"layers.{i}"] == pytest.approx(float(weight), rel=1e-6)
    assert norms.take() == {}  # taken once
    # another rank holds the same full gradients at stage 0: only rank 0 counts them
    other = PerLayerNorms(2, model, rank=1, device=torch.device("cpu"))
    other.measure(_Stage0Engine())
    assert set(other.take()["layer_grad_norm"].values()) == {0.0}


def test_the_interval_must_fall_on_log_lines(tmp_path, shards):
    from ds_train.config import ConfigError, load_config, validate
    from tests.helpers import base_config, write_config

    cfg = write_config(tmp_path / "c.yaml", base_config(tmp_path / "run", shards))
    validate(load_config(cfg, ["train.log_every=5", "train.per_layer_norms_every=10"]))
    for every in (7, -5):
        with pytest.raises(
            ConfigError,
            match=f"train.per_layer_norms_every={every} must be 0 or a multiple of train.log_every=5",
        ):
            validate(load_config(cfg, ["train.log_every=5", f"train.per_layer_norms_every={every}"]))
