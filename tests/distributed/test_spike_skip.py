"""train.skip_spike_sigma on DeepSpeed itself: an update the gate refuses leaves the weights, Adam's
moments and its step count as they were, at ZeRO-0 (fp32 and bf16), ZeRO-2 and ZeRO-3 on 2 ranks;
and a spiked step of a real run is skipped, counted, and kept out of an exact resume."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from tests.helpers import base_config, read_metrics, run_on_gloo_ranks, torchrun, write_config

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def _engine(stage: int, precision: str, world: int, seen: list, offload: bool = False):
    from ds_train.distributed.engine import gate_optimizer_step
    from tests.distributed.toy_engine import toy_engine

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    engine = toy_engine(model, stage, precision, world, offload=offload)
    verdicts = iter([])

    def allow(norm) -> bool:
        seen.append(None if norm is None else float(norm))
        return next(verdicts)

    gate_optimizer_step(engine, allow)

    def step(x: torch.Tensor, run: bool) -> None:
        nonlocal verdicts
        verdicts = iter([run] * 8)  # asked once per group (ZeRO-1/2) or sub-group (ZeRO-3)
        dtype = next(engine.module.parameters()).dtype
        loss = engine(x.to(dtype)).float().pow(2).sum()
        engine.backward(loss)
        asked = len(seen)
        engine.step()
        # the gate saw this step's norm (not the previous step's), however often it was asked
        norm = float(engine.get_global_grad_norm())
        assert len(seen) > asked and all(n == pytest.approx(norm, rel=1e-6) for n in seen[asked:])

    return engine, step


def _weights(engine) -> list[torch.Tensor]:
    from ds_train.distributed.engine import gathered

    params = list(engine.module.parameters())
    with gathered(params):
        return [p.detach().float().clone() for p in params]


def _rank_main(rank: int, world: int, stage: int, precision: str, offload: bool, out: str) -> None:
    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world))  # as a launcher sets
    batches = [torch.randn(2, 8, generator=torch.Generator().manual_seed(10 * k + rank)) for k in range(3)]
    seen: list = []
    skipped, step = _engine(stage, precision, world, seen, offload)
    step(batches[0], True)
    before = _weights(skipped)
    step(batches[1], False)  # refused: nothing may move
    unchanged = all(torch.equal(a, b) for a, b in zip(before, _weights(skipped)))
    step(batches[2], True)
    plain, step_plain = _engine(stage, precision, world, [], offload)
    step_plain(batches[0], True)
    step_plain(batches[2], True)  # the same run without the refused batch
    same = all(torch.equal(a, b) for a, b in zip(_weights(skipped), _weights(plain)))
    moved = not all(torch.equal(a, b) for a, b in zip(before, _weights(skipped)))
    Path(out, f"{rank}.json").write_text(
        json.dumps({"unchanged": unchanged, "same": same, "moved": moved, "norms": seen})
    )


@pytest.mark.parametrize(
    ("stage", "precision", "world", "offload"),
    [
        (0, "fp32", 1, False),
        (0, "bf16", 1, False),
        (1, "bf16", 2, False),
        (2, "bf16", 2, False),
        (3, "fp32", 2, False),
        (2, "fp32", 1, True),
    ],
    ids=[
        "zero0-fp32",
        "zero0-bf16",
        "zero1-bf16-2ranks",
        "zero2-bf16-2ranks",
        "zero3-fp32-2ranks",
        "zero2-cpu-adam",
    ],
)
def test_a_refused_update_changes_nothing_deepspeed_keeps(tmp_path, stage, precision, world, offload):
    """The last case steps DeepSpeed's CPU Adam (optimizer offload) instead of torch's AdamW."""
    run_on_gloo_ranks(_rank_main, world, stage, precision, offload, str(tmp_path))
    for rank in range(world):
        r = json.loads((tmp_path / f"{rank}.json").read_text())
        assert r["unchanged"] and r["moved"], r
        # after it, the weights are those of a run that never saw the refused batch: Adam's moments
        # and step count were left alone too
        assert r["same"], r
        assert r["norms"] and all(n is not None and n > 0 for n in r["norms"]), r["norms"]


def test_a_spiked_step_is_skipped_counted_and_resumed_exactly(tmp_path, shards):
    """A 200× loss at step 9 of a 2-rank ZeRO-2 run: skipped, with a warning and skipped_steps. A
    second run killed after step 10 resumes from its step-8 checkpoint, skips step 9 again from the
    history it saved, and ends where the uninterrupted run did, loss for loss."""

    def config(name: str) -> dict:
        return base_config(
            tmp_path / name,
            shards,
            train={
                "max_steps": 12,
                "log_every": 1,
                "save_every": 8,
                "skip_spike_sigma": 6,
                "skip_spike_window": 8,
            },
            zero={"stage": 2},
        )

    spike = "spike@step=9,x=200"
    whole = torchrun(
        ["pretrain", str(write_config(tmp_path / "a.yaml", config("a")))], env={"DS_TRAIN_FAULT": spike}
    )
    assert "step 9: update skipped (train.skip_spike_sigma=6): loss" in whole.stderr
    records = {r["step"]: r for r in read_metrics(tmp_path / "a") if "loss" in r}
    assert [records[s]["skipped_steps"] for s in (8, 9, 12)] == [0, 1, 1]
    assert records[9]["loss"] > 50 * records[8]["loss"]  # what the step computed, logged as it was
    state = json.loads((tmp_path / "a/checkpoints/step_00000008/ds_train_state.json").read_text())
    assert len(state["spike_guard"]["losses"]) == 8 and state["spike_guard"]["skipped_steps"] == 0

    b = write_config(tmp_path / "b.yaml", config("b"))
    killed = torchrun(["pretrain", str(b)], env={"DS_TRAIN_FAULT": f"{spike};kill@step=10"}, check=False)
    assert killed.returncode != 0
    again = torchrun(["pretrain", str(b)], env={"DS_TRAIN_FAULT": spike})
    assert "step 9: update skipped" in again.stderr
    resumed = {r["step"]: r for r in read_metrics(tmp_path / "b") if "loss" in r}  # the last attempt's
    assert [resumed[s]["loss"] for s in range(9, 13)] == [records[s]["loss"] for s in range(9, 13)]
    assert resumed[12]["skipped_steps"] == 1  # this attempt's count, from the checkpoint's 0
