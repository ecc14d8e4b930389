"""TB scale without TB of disk, and resume cost: a synthesised 100,000-shard manifest (~1 TB of
10 MB shards) whose shards are symlinks to a few real 10 MB shards.

Measured, each as the median of --repeats fresh starts:
- listing: rank 0 reads and parses index.json (the one listing per job) and pickles the shard sets
  for the broadcast (`_plan_on_rank0` in train/pretrain.py); the broadcast payload size
- time to first batch on a rank: unpickle the broadcast shard sets, build the plan, first
  micro-batch (in-process, and through make_loader with 2 workers)
- per-rank index memory: Python heap retained by the shard sets + plan + first batch (tracemalloc),
  and the peak while rank 0 parses the manifest
- resume: time to the first batch when starting at 90% of the epoch vs at 0% (goal ≤ 1.5×)
Goals: time to first batch ≤ 10 s, per-rank index memory ≤ 200 MB.

    .venv/bin/python bench/bench_data_scale.py --shards 100000 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("OMP_NUM_THREADS", "1")

from bench.data_fixtures import synthetic_shards  # noqa: E402
from ds_train.data.loader import MicroBatches, build_plan, load_shard_sets, make_loader  # noqa: E402
from ds_train.data.shard_format import MANIFEST  # noqa: E402
from ds_train.distributed.deepspeed_config import BatchLayout  # noqa: E402
from ds_train.objectives.causal_lm import CausalLM  # noqa: E402


def synthesise(root: Path, n_shards: int, real: Path) -> Path:
    """A shard set of n_shards entries; shard i is a symlink to real shard i % k."""
    out = root / f"scale-{n_shards}"
    if (out / MANIFEST).exists():
        return out
    out.mkdir(parents=True)
    base = json.loads((real / MANIFEST).read_text())
    entries = []
    for i in range(n_shards):
        src = base["shards"][i % len(base["shards"])]
        name = f"train-{i:06d}.tar"
        os.symlink(real / src["name"], out / name)
        entries.append({**src, "name": name})
    manifest = {
        **base,
        "shards": entries,
        "total_rows": sum(e["rows"] for e in entries),
        "total_tokens": sum(e["tokens"] for e in entries),
        "total_documents": sum(e["documents"] for e in entries),
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return out


def first_batch(sets, spec: str, lay: BatchLayout, start_step: int, workers: int) -> dict:
    plan = build_plan(spec, seed=1, shuffle=True, window=16, shard_sets=sets)
    ds = MicroBatches(plan, lay, 0, start_step, CausalLM(eos_id=0, pad_id=None), None)
    if workers == 0:
        return ds[0]
    return next(iter(make_loader(ds, num_workers=workers, prefetch_factor=2)))


def _rank(rank: int, world: int, port: int, spec: str, out: str) -> None:
    """One rank of a real gloo job: pretrain's own `_plan_on_rank0` (rank 0 lists, broadcasts)."""
    import torch.distributed as dist

    from ds_train.config import from_dict
    from ds_train.distributed.engine import all_gather_object
    from ds_train.train import pretrain

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    cfg = from_dict(
        {
            "run": {"output_dir": out + ".run", "seed": 1},
            "model": {"config": str(REPO / "configs/model/micro-llama.json")},
            "data": {"train": spec},
            "train": {"max_steps": 1, "global_batch_size": 8 * world, "micro_batch_size": 8},
        }
    )
    dist.barrier()
    t0 = time.perf_counter()
    plan = pretrain._plan_on_rank0(cfg.data.train, cfg, shuffle=True)
    lay = BatchLayout(8 * world, 8, 1, world)
    ds = MicroBatches(plan, lay, rank, 0, CausalLM(0, None), None)
    next(iter(make_loader(ds, num_workers=2, prefetch_factor=2)))
    elapsed = time.perf_counter() - t0
    del plan, ds
    dist.barrier()
    tracemalloc.start()  # again, measured (tracing slows allocation down: not timed)
    plan = pretrain._plan_on_rank0(cfg.data.train, cfg, shuffle=True)
    MicroBatches(plan, lay, rank, 0, CausalLM(0, None), None)[0]
    current, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    results = all_gather_object((rank, elapsed, current, peak))
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    dist.destroy_process_group()


def ranks_job(spec: str, world: int, tmp: Path) -> list:
    import torch.multiprocessing as mp

    from tests.helpers import free_port

    out = tmp / "ranks.json"
    mp.spawn(_rank, args=(world, free_port(), spec, str(out)), nprocs=world, join=True)
    return json.loads(out.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", type=int, default=100_000)
    p.add_argument("--real-shards", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dir", default=None, help="where the shards go (default: a temp dir)")
    p.add_argument(
        "--ranks", type=int, default=2, help="also time a real gloo job of this many ranks (0: no)"
    )
    args = p.parse_args()
    rows = (10 << 20) // ((args.seq_len + 1) * 2)  # 10 MB shards
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.dir or tmp)
        real = synthetic_shards(
            root / f"real-{args.real_shards}x{rows}", shards=args.real_shards, rows=rows, seq_len=args.seq_len
        )
        t0 = time.perf_counter()
        spec = str(synthesise(root, args.shards, real))
        manifest_mb = os.path.getsize(Path(spec) / MANIFEST) / 1e6
        total_tb = args.shards * os.path.getsize(next(real.glob("*.tar"))) / 1e12
        print(
            f"{args.shards:,} shards (~{total_tb:.2f} TB as listed, {args.real_shards} real files), "
            f"index.json {manifest_mb:.1f} MB, set up in {time.perf_counter() - t0:.1f}s"
        )
        lay = BatchLayout(8, 8, 1, 1)  # one rank's micro-batch of 8 × seq_len
        listing, payload_mb, t_first, t_first_w, t_resume0, t_resume90 = [], 0.0, [], [], [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            sets = load_shard_sets(spec)  # rank 0 only
            payload = pickle.dumps(("ok", sets))  # what broadcast_object sends
            listing.append(time.perf_counter() - t0)
            payload_mb = len(payload) / 1e6
            epoch = sum(s.num_rows for s in sets)
            for start, bucket in ((0, t_resume0), (int(0.9 * epoch) // lay.global_batch_size, t_resume90)):
                t0 = time.perf_counter()
                received = pickle.loads(payload)[1]  # every rank
                b = first_batch(received, spec, lay, start, workers=0)
                bucket.append(time.perf_counter() - t0)
                assert int(b["step"]) == start
            t_first.extend(t_resume0[-1:])
            t0 = time.perf_counter()
            first_batch(pickle.loads(payload)[1], spec, lay, 0, workers=2)
            t_first_w.append(time.perf_counter() - t0)

        tracemalloc.start()
        sets = load_shard_sets(spec)
        payload = pickle.dumps(("ok", sets))
        _, parse_peak = tracemalloc.get_traced_memory()
        del sets
        tracemalloc.stop()
        tracemalloc.start()
        received = pickle.loads(payload)[1]
        plan = build_plan(spec, seed=1, shuffle=True, window=16, shard_sets=received)
        ds = MicroBatches(plan, lay, 0, 0, CausalLM(eos_id=0, pad_id=None), None)
        ds[0]
        retained, _ = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        job = ranks_job(spec, args.ranks, Path(tmp)) if args.ranks else []

    med = statistics.median
    print(f"\nmachine: {platform.node()} {os.cpu_count()} cores; load average {os.getloadavg()[0]:.1f}")
    print(
        f"rank-0 listing (read + parse index.json + pickle)  {med(listing):6.2f} s, payload {payload_mb:.1f} MB"
    )
    print(f"rank-0 peak heap while parsing                      {parse_peak / 1e6:6.1f} MB")
    print(f"per-rank index memory (sets + plan + first batch)  {retained / 1e6:6.1f} MB   (goal ≤ 200 MB)")
    print(f"time to first batch, in-process                     {med(t_first):6.2f} s")
    print(f"time to first batch, make_loader with 2 workers     {med(t_first_w):6.2f} s")
    print(
        f"  + rank-0 listing: job start to first batch        {med(listing) + med(t_first_w):6.2f} s   (goal ≤ 10 s)"
    )
    for rank, elapsed, current, peak in job:
        print(
            f"gloo job, rank {rank}/{len(job)}: _plan_on_rank0 + first batch (2 workers) {elapsed:6.2f} s, "
            f"heap retained {current / 1e6:.1f} MB (peak {peak / 1e6:.1f} MB)"
        )
    print(
        f"resume at 90% vs 0% of the epoch                     {med(t_resume90):6.3f} s vs {med(t_resume0):6.3f} s "
        f"= {med(t_resume90) / med(t_resume0):.2f}×   (goal ≤ 1.5×)"
    )


if __name__ == "__main__":
    main()
