"""The loader in 2 real gloo processes × 2 DataLoader workers each: one manifest listing (rank 0,
broadcast), exactly-once per epoch, the same number of steps on every rank, and the global batches
of a 1-process run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import base_config, run_on_gloo_ranks

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def _rank_main(rank: int, world: int, cfg_dict: dict, out: str) -> None:
    from ds_train.config import from_dict
    from ds_train.data.loader import MicroBatches, make_loader
    from ds_train.distributed.deepspeed_config import batch_layout
    from ds_train.distributed.engine import all_gather_object
    from ds_train.objectives.causal_lm import CausalLM
    from ds_train.train import pretrain

    if rank != 0:  # only rank 0 may list the store: any other listing fails the test

        def no_listing(spec):
            raise AssertionError(f"rank {rank} read the manifests")

        pretrain.load_shard_sets = no_listing
    cfg = from_dict(cfg_dict)
    plan = pretrain._plan_on_rank0(cfg.data.train, cfg, shuffle=True)
    lay = batch_layout(cfg.train, world)
    steps = cfg.train.max_steps
    ds = MicroBatches(plan, lay, rank, 0, CausalLM(0, 1), None)
    loader = make_loader(ds, num_workers=2, prefetch_factor=2)  # the endless training loader
    mine = []
    for k, b in enumerate(loader):
        if k == steps * lay.grad_accum:
            break
        mine.append([int(b["step"]), b["sample_ids"].tolist(), b["shard"].tolist(), b["row"].tolist()])
    gathered = all_gather_object(mine)
    if rank == 0:
        Path(out).write_text(json.dumps({"epoch_size": plan.epoch_size, "ranks": gathered}))


def _run(world: int, cfg: dict, out: Path) -> dict:
    run_on_gloo_ranks(_rank_main, world, cfg, str(out))
    return json.loads(out.read_text())


def test_two_ranks_two_workers_exactly_once_and_same_global_batches(tmp_path, shards):
    cfg = base_config(tmp_path / "run", shards)
    cfg["train"].update(global_batch_size=8, micro_batch_size=2)
    from ds_train.data.shard_set import load_shard_set

    steps = load_shard_set(str(shards / "train")).num_rows // 8 + 2  # a full epoch and into the next
    cfg["train"]["max_steps"] = steps
    two = _run(2, cfg, tmp_path / "two.json")
    one = _run(1, cfg, tmp_path / "one.json")
    r0, r1 = two["ranks"]
    assert len(r0) == len(r1) == steps * 2  # equal step counts: 2 micro-batches per step each
    assert [b[0] for b in r0] == [b[0] for b in r1] == [s for s in range(steps) for _ in range(2)]
    positions = sorted(p for rank in two["ranks"] for b in rank for p in b[1])
    assert positions == list(range(steps * 8))
    first_epoch = {
        (s, r)
        for rank in two["ranks"]
        for b in rank
        for p, s, r in zip(b[1], b[2], b[3])
        if p < two["epoch_size"]
    }
    assert len(first_epoch) == two["epoch_size"]
    # global batch of step s = rank 0's micro-batches then rank 1's; equal to the 1-rank run
    for s in range(steps):
        g2 = [x for rank in (r0, r1) for b in rank[2 * s : 2 * s + 2] for x in zip(b[1], b[2], b[3])]
        (only,) = one["ranks"]
        g1 = [x for b in only[4 * s : 4 * s + 4] for x in zip(b[1], b[2], b[3])]
        assert g2 == g1
