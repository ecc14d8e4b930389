"""The CPU cost of a checkpoint file's sha256: read back after `torch.save` (ds-train before
2026-12-03) vs hashed while written (ds_train.checksum.HashingWriter, inline or in a helper thread)
vs `torch.save` alone (DeepSpeed's bare save, no checksum). One process, a 1.07 GB state dict of
64 fp32 tensors written to tmpfs, so the disk drops out and what remains is each way's work per
byte; systems alternate, medians of REPEATS.

    .venv/bin/python bench/bench_hash_write.py --dir /dev/shm --repeats 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

from ds_train.checksum import HashingWriter, file_sha256


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/dev/shm")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    state = {f"p{i}": torch.randn(4 << 20) for i in range(64)}
    gb = sum(t.numel() * t.element_size() for t in state.values()) / 1e9
    path = Path(args.dir) / f"bench_hash_write_{os.getpid()}.pt"

    def streamed(overlap: bool):
        def save() -> None:
            with open(path, "wb") as raw, HashingWriter(raw, overlap=overlap) as sink:
                torch.save(state, sink)

        return save

    systems = {
        "torch.save alone (no checksum)": lambda: torch.save(state, path),
        "torch.save, then read back and hash": lambda: (torch.save(state, path), file_sha256(path)),
        "hashed while written, inline": streamed(False),
        "hashed while written, helper thread": streamed(True),
    }
    times: dict[str, list[float]] = {name: [] for name in systems}
    for _ in range(args.repeats):
        for name, save in systems.items():
            path.unlink(missing_ok=True)
            t0 = time.perf_counter()
            save()
            times[name].append(time.perf_counter() - t0)
    path.unlink(missing_ok=True)
    base = statistics.median(times["torch.save alone (no checksum)"])
    print(f"{gb:.2f} GB per save in {args.dir}, medians of {args.repeats}")
    print("| writer | s | GB/s | vs torch.save alone |\n|---|---|---|---|")
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"| {name} | {m:.2f} | {gb / m:.2f} | {m / base:.2f}× |")


if __name__ == "__main__":
    main()
