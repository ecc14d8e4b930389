"""A data.train mixture logs each source's training loss (`loss/<name>`): the same on 2 ranks at
ZeRO-2 through the chunked head as on 1 rank from full logits, and the run's loss is their
token-weighted mean."""

from __future__ import annotations

import pytest

from tests.helpers import base_config, read_metrics, run_cli, torchrun, write_config

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def test_each_source_of_a_mixture_has_its_training_loss(tmp_path, shards):
    mixture = [
        {"path": str(shards / "train"), "weight": 3, "name": "web"},
        {"path": str(shards / "valid"), "weight": 1, "name": "code"},
    ]
    runs = {}
    for name, launch, overrides in (
        ("two", torchrun, {"model": {"loss_chunk_tokens": 24}}),
        ("one", run_cli, {"model": {"loss_chunk_tokens": 0}, "zero": {"stage": 0}}),
    ):
        cfg = base_config(tmp_path / name, shards, train={"max_steps": 4, "log_every": 2}, **overrides)
        cfg["data"]["train"] = mixture
        launch(["pretrain", write_config(tmp_path / f"{name}.yaml", cfg)])
        runs[name] = {r["step"]: r for r in read_metrics(tmp_path / name) if "loss" in r}
    for step in (2, 4):
        two, one = runs["two"][step], runs["one"][step]
        for source in ("web", "code"):
            assert two[f"loss/{source}"] == pytest.approx(one[f"loss/{source}"], rel=1e-4), (step, source)
        # the run's loss lies between the sources' (a token-weighted mean of them)
        # weights 3:1, over 2 steps of 8 rows: about three quarters of the tokens are web's
        assert two["mix/web"] + two["mix/code"] == pytest.approx(1.0) and 0.5 < two["mix/web"] < 1.0
        low, high = sorted([two["loss/web"], two["loss/code"]])
        assert low <= two["loss"] <= high and high - low > 1e-3, two
    plain = base_config(tmp_path / "plain", shards, train={"max_steps": 2, "log_every": 2})
    run_cli(["pretrain", write_config(tmp_path / "plain.yaml", plain)])
    assert not any(k.startswith("loss/") for r in read_metrics(tmp_path / "plain") for k in r)
