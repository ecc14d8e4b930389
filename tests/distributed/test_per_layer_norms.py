"""train.per_layer_norms_every on DeepSpeed itself: the per-layer norms that each rank adds up from
the gradient and weight pieces it holds (distributed/param_shards.py) equal the norms of the full
gradients and fp32 weights that DeepSpeed's own gather returns, at every ZeRO stage, in fp32 and
bf16, on 2 ranks and with CPU Adam; together they make up the global norm DeepSpeed clips with."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from tests.helpers import base_config, read_metrics, run_on_gloo_ranks, torchrun, write_config

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


class Toy(torch.nn.Module):
    """Named as a transformer is: an embedding, numbered blocks, a head (groups: embed, layers.0,
    layers.1, head)."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Linear(8, 16)
        self.layers = torch.nn.ModuleList([torch.nn.Linear(16, 16), torch.nn.Linear(16, 16)])
        self.head = torch.nn.Linear(16, 4, bias=False)

    def forward(self, x):
        x = torch.tanh(self.embed(x))
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return self.head(x)


def _rank_main(
    rank: int, world: int, stage: int, precision: str, offload: bool, fp32_grads: bool, out: str
) -> None:
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad

    from ds_train.train.per_layer_norms import PerLayerNorms, layer_group
    from tests.distributed.toy_engine import toy_engine

    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world))  # as a launcher sets
    torch.manual_seed(0)
    model = Toy()
    engine = toy_engine(
        model, stage, precision, world, offload=offload, accumulation=2, fp32_grads=fp32_grads
    )
    norms = PerLayerNorms(1, engine.module, rank, torch.device("cpu"))
    results = []
    for step in range(2):  # the second step measures weights an update has moved
        for micro in range(2):
            x = torch.randn(2, 8, generator=torch.Generator().manual_seed(100 * step + 10 * micro + rank))
            dtype = next(engine.module.parameters()).dtype
            engine.backward(engine(x.to(dtype)).float().pow(2).sum())
            if micro == 1:
                norms.measure(engine)
                # DeepSpeed's gather of each full gradient and weight (a collective per parameter)
                full: dict[str, list[float]] = {}
                for name, p in engine.module.named_parameters():
                    w = safe_get_full_fp32_param(p)  # None at stage 0 in fp32: the weight is the master
                    g, w = safe_get_full_grad(p).float(), (p.detach() if w is None else w).float()
                    sums = full.setdefault(layer_group(name), [0.0, 0.0])
                    sums[0] += float(g.pow(2).sum())
                    sums[1] += float(w.pow(2).sum())
            engine.step()
        record = norms.take()
        results.append(
            {
                "grad": record["layer_grad_norm"],
                "weight": record["layer_weight_norm"],
                "full_grad": {k: v[0] ** 0.5 for k, v in full.items()},
                "full_weight": {k: v[1] ** 0.5 for k, v in full.items()},
                "global": float(engine.get_global_grad_norm()),
            }
        )
    Path(out, f"{rank}.json").write_text(json.dumps(results))


CASES = {  # (stage, precision, ranks, optimizer offload, fp32 gradient accumulation)
    "zero0-fp32-2ranks": (0, "fp32", 2, False, False),
    "zero0-bf16-2ranks": (0, "bf16", 2, False, False),
    "zero1-bf16-2ranks": (1, "bf16", 2, False, False),
    # DeepSpeed's BF16_Optimizer: a full-size accumulation buffer on each rank, cut to the fragment
    "zero1-bf16-fp32-grads-2ranks": (1, "bf16", 2, False, True),
    "zero2-bf16-2ranks": (2, "bf16", 2, False, False),
    "zero2-cpu-adam-2ranks": (2, "fp32", 2, True, False),
    "zero3-bf16-2ranks": (3, "bf16", 2, False, False),
}


@pytest.mark.parametrize(
    ("stage", "precision", "world", "offload", "fp32_grads"), CASES.values(), ids=CASES.keys()
)
def test_each_rank_counts_its_own_pieces_once(tmp_path, stage, precision, world, offload, fp32_grads):
    run_on_gloo_ranks(_rank_main, world, stage, precision, offload, fp32_grads, str(tmp_path))
    for rank in range(world):
        for step in json.loads((tmp_path / f"{rank}.json").read_text()):
            assert list(step["grad"]) == ["embed", "layers.0", "layers.1", "head"]
            for key in ("grad", "weight"):
                for group, value in step[key].items():
                    assert value > 0 and value == pytest.approx(step[f"full_{key}"][group], rel=1e-5), (
                        key,
                        group,
                        step,
                    )
            # the layers make up the global norm DeepSpeed computed (before clipping) for the update
            total = sum(v**2 for v in step["grad"].values()) ** 0.5
            assert total == pytest.approx(step["global"], rel=1e-4), step


def test_a_run_logs_its_layer_norms_and_reports_them(tmp_path, shards):
    """A 2-rank ZeRO-2 pretraining run: per-block norms in metrics.jsonl at every second log line,
    making up the logged global norm, and `ds-train report` draws them."""
    from ds_train.cli import main

    cfg = base_config(
        tmp_path / "run", shards, train={"max_steps": 4, "per_layer_norms_every": 2}, zero={"stage": 2}
    )
    torchrun(["pretrain", write_config(tmp_path / "run.yaml", cfg)])
    records = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    measured = [r for r in records if "layer_grad_norm" in r]
    assert [r["step"] for r in measured] == [2, 4]
    for r in measured:
        groups = list(r["layer_grad_norm"])
        assert groups[0] == "model.embed_tokens" and "model.layers.0" in groups and "model.layers.1" in groups
        assert r["layer_weight_norm"].keys() == r["layer_grad_norm"].keys()
        total = sum(v**2 for v in r["layer_grad_norm"].values()) ** 0.5
        assert total == pytest.approx(r["grad_norm"], rel=1e-3)
    assert main(["report", str(tmp_path / "run")]) == 0
    assert (tmp_path / "run" / "per_layer_norms.png").stat().st_size > 10_000
