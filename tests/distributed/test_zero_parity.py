"""ZeRO parity: the same run under stages 0-3 on 2 ranks and on 1 rank (2× accumulation) gives the
same per-step losses, and a fresh model starts at ln(vocab)."""

from __future__ import annotations

import math

import pytest

from tests.helpers import TOKENIZER, base_config, run_cli, torchrun, train_losses, write_config

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

STEPS = 10


@pytest.fixture(scope="module")
def losses(tmp_path_factory, shards):
    tmp = tmp_path_factory.mktemp("parity")
    out = {}
    for stage in (0, 1, 2, 3):
        run = tmp / f"stage{stage}"
        cfg = write_config(
            tmp / f"stage{stage}.yaml",
            base_config(run, shards, train={"max_steps": STEPS, "lr": 1e-2}, zero={"stage": stage}),
        )
        torchrun(["pretrain", cfg])
        out[f"2 ranks, ZeRO-{stage}"] = train_losses(run)
    run = tmp / "single"
    cfg = write_config(
        tmp / "single.yaml",
        base_config(run, shards, train={"max_steps": STEPS, "lr": 1e-2}, zero={"stage": 0}),
    )
    run_cli(["pretrain", cfg])
    out["1 rank, 2x accumulation"] = train_losses(run)
    return out


def test_every_stage_and_world_size_agree(losses):
    reference = losses["1 rank, 2x accumulation"]
    assert sorted(reference) == list(range(1, STEPS + 1))
    for name, run in losses.items():
        for step, ref in reference.items():
            assert run[step] == pytest.approx(ref, rel=1e-4), f"{name} step {step}: {run[step]} vs {ref}"


def test_loss_falls_and_starts_at_ln_vocab(losses):
    from transformers import AutoTokenizer

    ln_v = math.log(len(AutoTokenizer.from_pretrained(str(TOKENIZER))))
    for name, run in losses.items():
        assert abs(run[1] - ln_v) / ln_v < 0.05, f"{name}: first loss {run[1]} vs ln(V)={ln_v:.3f}"
        assert run[STEPS] < run[1] - 0.1, f"{name}: loss did not fall"
