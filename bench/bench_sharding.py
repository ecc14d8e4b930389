"""Sharding throughput: `ds-train shard` (read + tokenize + pack + write tars + manifest) vs the
tokenizer's own batch encode of the same text, and 2 worker processes vs 1, in one invocation.

Systems (every repeat runs all of them in a rotated order):
- `encode_fast`: the Rust tokenizer's `encode_batch_fast` over the documents, already in memory
  (no reading, no writing) in batches of 512 — the strictest baseline
- `encode_hf`: the transformers call `tokenizer(texts)` on the same batches
- `shard_1`: `shard_corpus(..., workers=1)` from the JSON-lines file to finished shards
- `shard_2`: the same with 2 worker processes
All run with TOKENIZERS_PARALLELISM=false, so a worker is one core and `encode_*` is one core too.
Goals: shard_1 ≥ 0.8× encode (the tokenizer's batch encode), shard_2 ≥ 1.8× shard_1.
Ratios are printed for the medians and for the best repeat of each system: on a machine shared
with other work the best repeat is the one least disturbed (2 workers need 2 idle cores).

    .venv/bin/python bench/bench_sharding.py --mb 32 --repeats 3
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ["TOKENIZERS_PARALLELISM"] = "false"
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ds_train.data.sharding import ShardOptions, shard_corpus  # noqa: E402

TOKENIZER = REPO / "configs/tokenizers/stdlib-bpe-4k"
BATCH = 512


def write_corpus(path: Path, megabytes: int) -> list[str]:
    """Stdlib docstrings, cycled (each copy numbered so no two documents are equal) to `megabytes`."""
    from ds_train.demo.corpus import iter_docstrings

    docs = [d["text"] for d in iter_docstrings()]
    texts, size = [], 0
    for i in itertools.count():
        text = f"{i}: {docs[i % len(docs)]}"
        texts.append(text)
        size += len(text.encode()) + 12
        if size >= megabytes << 20:
            break
    with open(path, "w") as fh:
        for t in texts:
            fh.write(json.dumps({"text": t}) + "\n")
    return texts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mb", type=int, default=32, help="corpus size in MB of JSON lines")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workers", type=int, nargs="*", default=[1, 2])
    args = p.parse_args()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(TOKENIZER))
    backend = tok.backend_tokenizer
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.jsonl"
        texts = write_corpus(corpus, args.mb)
        print(
            f"corpus: {len(texts):,} documents, {corpus.stat().st_size / 1e6:.1f} MB, seq_len {args.seq_len}"
        )
        stream_tokens = 0

        def encode_fast() -> int:
            n = 0
            for i in range(0, len(texts), BATCH):
                n += sum(
                    len(e.ids) + 1
                    for e in backend.encode_batch_fast(texts[i : i + BATCH], add_special_tokens=False)
                )
            return n

        def encode_hf() -> int:
            n = 0
            for i in range(0, len(texts), BATCH):
                n += sum(len(x) + 1 for x in tok(texts[i : i + BATCH], add_special_tokens=False)["input_ids"])
            return n

        def shard(workers: int):
            def run() -> int:
                out = Path(tmp) / f"out{workers}"
                shutil.rmtree(out, ignore_errors=True)
                opts = ShardOptions(seq_len=args.seq_len, progress=False, workers=workers)
                shard_corpus([str(corpus)], out, tok, opts)
                return stream_tokens

            return run

        systems = {"encode_fast": encode_fast, "encode_hf": encode_hf}
        systems.update({f"shard_{w}": shard(w) for w in args.workers})
        stream_tokens = encode_fast()  # documents + one separator each: what the sharder packs
        rates: dict[str, list[float]] = {k: [] for k in systems}
        names = list(systems)
        for r in range(args.repeats):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                t0 = time.perf_counter()
                tokens = systems[name]()
                dt = time.perf_counter() - t0
                rates[name].append(tokens / dt)
                print(f"  repeat {r} {name:12s} {tokens / dt / 1e6:6.2f} M tokens/s ({dt:.1f}s)", flush=True)
    print(f"\nmachine: {platform.node()} {os.cpu_count()} cores; load average {os.getloadavg()[0]:.1f}")
    for stat, fn in (("median", statistics.median), ("best", max)):
        agg = {k: fn(v) for k, v in rates.items()}
        print(f"-- {stat} of {args.repeats} repeats")
        for name, rate in agg.items():
            extra = ""
            if name.startswith("shard_"):
                extra = f"  {rate / agg['encode_fast']:.2f}× encode_fast  {rate / agg['encode_hf']:.2f}× encode_hf"
                if name != "shard_1" and "shard_1" in agg:
                    extra += f"  {rate / agg['shard_1']:.2f}× shard_1"
            print(f"{name:12s} {rate / 1e6:6.2f} M tokens/s{extra}")


if __name__ == "__main__":
    main()
