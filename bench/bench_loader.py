"""Loader throughput per core: ds_train's random-access loader vs a bare stock-webdataset read of
the same local shards, side by side in one invocation.

Systems (one process, one thread each; every repeat runs them all, in a rotated order, over the
same warm-cache shards; the median tokens/s counts):
- `wds_raw`: webdataset streaming the tars, no decoding (bytes / 2 as tokens) — an upper bound
- `wds_npy`: webdataset streaming + its stock `.npy` decoder — the baseline (goal: ≥ 0.9×)
- `ds_rows`: the global order (shard permutation + windowed row shuffle) + RowReader gathers
- `wds_batches`: `wds_npy` cut into micro-batches and collated by the causal-LM objective (int64
  tensors, labels, per-document position ids) — the baseline for the next two
- `ds_batches`: what a DataLoader worker does per micro-batch for the trainer: `ds_rows` plus the
  same collate and the batch bookkeeping (step, sample ids)
- `ds_loader`: `make_loader` with one worker process, batches crossing to the main process
- `hf_parquet`: 🤗 `datasets` streaming the same rows from parquet files (one per shard, a
  fixed-size list<uint16> column, 256-row row groups), `.with_format("numpy").iter(micro_batch)`:
  its fastest path, batches of int64 arrays
- `hf_parquet_rows`: the same stream sample by sample in its default format (Python lists), as
  `for sample in dataset` gets it

Goals: ds_rows ≥ 0.9× wds_npy and ds_batches ≥ 0.9× wds_batches (per core). Every system is a
generator; time to first batch is the time from calling it (plan building, opening files, a
worker's fork) to its first item, and is reported next to the tokens/s of the whole pass.

    .venv/bin/python bench/bench_loader.py --repeats 3
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.data_fixtures import synthetic_shards  # noqa: E402
from ds_train.data.loader import MicroBatches, build_plan, make_loader  # noqa: E402
from ds_train.data.reader import RowReader  # noqa: E402
from ds_train.distributed.deepspeed_config import BatchLayout  # noqa: E402
from ds_train.objectives.causal_lm import CausalLM  # noqa: E402

# Each system yields the tokens of each item it produces (a sample, a block, a micro-batch).


def wds_raw(shard_dir: Path, urls: list[str], args) -> Iterator[int]:
    import webdataset as wds

    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        yield len(sample["tokens.npy"]) // 2


def wds_npy(shard_dir: Path, urls: list[str], args) -> Iterator[int]:
    import webdataset as wds

    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode():
        yield sample["tokens.npy"].size


def wds_batches(shard_dir: Path, urls: list[str], args) -> Iterator[int]:
    """The webdataset read, cut into micro-batches and collated like ds_train's (no shuffle)."""
    import webdataset as wds

    collate = CausalLM(eos_id=0, pad_id=None).collate
    k = 0
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode():
        rows = sample["tokens.npy"]
        for lo in range(0, len(rows) - args.micro_batch + 1, args.micro_batch):
            batch = collate(rows[lo : lo + args.micro_batch], np.arange(k, k + args.micro_batch))
            yield batch["input_ids"].numel() + args.micro_batch
            k += args.micro_batch


def _hf_stream(args):
    import datasets

    datasets.disable_progress_bars()
    files = sorted(str(p) for p in Path(args.parquet_dir).glob("*.parquet"))
    return datasets.load_dataset("parquet", data_files=files, split="train", streaming=True)


def hf_parquet(shard_dir: Path, urls: list[str], args) -> Iterator[int]:
    for batch in _hf_stream(args).with_format("numpy").iter(batch_size=args.micro_batch):
        yield batch["input_ids"].size


def hf_parquet_rows(shard_dir: Path, urls: list[str], args) -> Iterator[int]:
    for sample in _hf_stream(args):
        yield len(sample["input_ids"])


def ds_rows(shard_dir: Path, urls: list[str], args) -> Iterator[int]:
    plan = build_plan(str(shard_dir), seed=1, shuffle=True, window=16)
    reader = RowReader(plan.sources, None)
    for lo in range(0, plan.epoch_size, args.micro_batch):
        rows, _ = reader.read(*plan.locate(np.arange(lo, lo + args.micro_batch)))
        yield rows.size


def _layout(args) -> BatchLayout:
    return BatchLayout(args.micro_batch, args.micro_batch, 1, 1)


def ds_batches(shard_dir: Path, urls: list[str], args) -> Iterator[int]:
    plan = build_plan(str(shard_dir), seed=1, shuffle=True, window=16)
    ds = MicroBatches(plan, _layout(args), 0, 0, CausalLM(eos_id=0, pad_id=None), None)
    for k in range(plan.epoch_size // args.micro_batch):
        yield ds[k]["input_ids"].numel() + args.micro_batch  # + the last label of each row


def ds_loader(shard_dir: Path, urls: list[str], args) -> Iterator[int]:
    plan = build_plan(str(shard_dir), seed=1, shuffle=True, window=16)
    ds = MicroBatches(plan, _layout(args), 0, 0, CausalLM(eos_id=0, pad_id=None), None)
    n = plan.epoch_size // args.micro_batch
    for b in make_loader(ds, num_workers=1, prefetch_factor=4, num_micro_batches=n):
        yield b["input_ids"].numel() + args.micro_batch


SYSTEMS = {
    "wds_raw": wds_raw,
    "wds_npy": wds_npy,
    "ds_rows": ds_rows,
    "wds_batches": wds_batches,
    "ds_batches": ds_batches,
    "ds_loader": ds_loader,
    "hf_parquet": hf_parquet,
    "hf_parquet_rows": hf_parquet_rows,
}
BASELINE = {
    "ds_rows": "wds_npy",
    "ds_batches": "wds_batches",
    "ds_loader": "wds_batches",
    "hf_parquet": "wds_npy",
    "hf_parquet_rows": "wds_npy",
}


def write_parquet(shard_dir: Path, urls: list[str], out: Path) -> Path:
    """The very rows of each tar shard as one parquet file (untimed set-up)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import webdataset as wds

    out.mkdir(parents=True, exist_ok=True)
    for url in urls:
        blocks = [
            s["tokens.npy"] for s in wds.WebDataset([url], shardshuffle=False, empty_check=False).decode()
        ]
        rows = np.concatenate(blocks)
        col = pa.FixedSizeListArray.from_arrays(pa.array(rows.ravel()), rows.shape[1])
        pq.write_table(pa.table({"input_ids": col}), out / (Path(url).stem + ".parquet"), row_group_size=256)
    return out


def run_system(name: str, shard_dir: Path, urls: list[str], args) -> tuple[int, float, float]:
    """(tokens, seconds for the whole pass, seconds to the first item)."""
    t0 = time.perf_counter()
    it = SYSTEMS[name](shard_dir, urls, args)
    tokens = next(it)
    first = time.perf_counter() - t0
    for n in it:
        tokens += n
    return tokens, time.perf_counter() - t0, first


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--rows", type=int, default=4096, help="rows per shard")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dir", default=None, help="where the synthetic shards go (default: a temp dir)")
    p.add_argument("--systems", nargs="*", default=list(SYSTEMS))
    args = p.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        shard_dir = synthetic_shards(
            Path(args.dir or tmp) / f"loader-{args.shards}x{args.rows}x{args.seq_len}",
            shards=args.shards,
            rows=args.rows,
            seq_len=args.seq_len,
        )
        urls = sorted(str(p) for p in shard_dir.glob("train-*.tar"))
        gb = sum(os.path.getsize(u) for u in urls) / 1e9
        print(f"{len(urls)} shards, {gb:.2f} GB, seq_len {args.seq_len}, micro-batch {args.micro_batch}")
        if any(s.startswith("hf_parquet") for s in args.systems):
            args.parquet_dir = write_parquet(shard_dir, urls, Path(str(shard_dir) + "-parquet"))
            pgb = sum(os.path.getsize(f) for f in Path(args.parquet_dir).glob("*.parquet")) / 1e9
            print(f"parquet copy for datasets: {pgb:.2f} GB")
        for u in [*urls, *Path(str(shard_dir) + "-parquet").glob("*.parquet")]:  # warm the page cache
            Path(u).read_bytes()
        rates: dict[str, list[float]] = {s: [] for s in args.systems}
        firsts: dict[str, list[float]] = {s: [] for s in args.systems}
        for r in range(args.repeats):
            order = args.systems[r % len(args.systems) :] + args.systems[: r % len(args.systems)]
            for name in order:
                tokens, dt, first = run_system(name, shard_dir, urls, args)
                rates[name].append(tokens / dt)
                firsts[name].append(first)
                print(
                    f"  repeat {r} {name:15s} {tokens / dt / 1e6:8.1f} M tokens/s ({tokens:,} tokens, {dt:.2f}s), "
                    f"first item after {first * 1e3:.1f} ms",
                    flush=True,
                )
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(
        f"\nmachine: {platform.node()} {os.cpu_count()} cores, {platform.processor() or platform.machine()}; "
        f"load average {os.getloadavg()[0]:.1f}; medians of {args.repeats} repeats, one process, one thread"
    )
    print("| system | M tokens/s per core | ratio | time to first item (ms) |")
    print("|---|---|---|---|")
    for name, rate in med.items():
        base = BASELINE.get(name)
        ratio = f"{rate / med[base]:.2f}× {base}" if base in med else "-"
        print(f"| {name} | {rate / 1e6:.1f} | {ratio} | {statistics.median(firsts[name]) * 1e3:.1f} |")


if __name__ == "__main__":
    main()
