"""What offload costs and saves: ds-train's ZeRO presets with and without offload, side by side.

Each mode is `ds-train pretrain` on 2 ranks (bench/ds_train_loop.py, bench_trainer's model and run
config: Llama, fp32, global batch 16 of micro 4), the modes alternating within each repeat.
Printed per mode: tokens/s by the median step, its ratio to the same stage without offload, and
the fullest rank's peak resident host memory. On a GPU machine offload moves optimizer state (and
at ZeRO-3 parameters) from device to host memory or NVMe and pays PCIe transfers; on this CPU-only
machine "device" and host are the same memory, so what it measures is the rest of the price:
DeepSpeed's CPU Adam against torch's AdamW, the extra copies, and for NVMe the swap I/O and the
host memory the swapped state no longer takes.

    .venv/bin/python bench/bench_offload.py --repeats 2 --steps 30
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_trainer import add_loop_args, launch_loop, loop_workspace, run_config

# mode → zero section; the first of each stage is the reference its offloads are compared with
MODES = {
    "ZeRO-2": {"stage": 2},
    "ZeRO-2, optimizer on CPU": {"stage": 2, "offload_optimizer": "cpu"},
    "ZeRO-3": {"stage": 3},
    "ZeRO-3, optimizer + params on CPU": {"stage": 3, "offload_optimizer": "cpu", "offload_param": "cpu"},
    "ZeRO-3, optimizer on NVMe": {"stage": 3, "offload_optimizer": "nvme"},
    "ZeRO-3, optimizer + params on NVMe": {"stage": 3, "offload_optimizer": "nvme", "offload_param": "nvme"},
    # DeepSpeed's optimizer swap buffers hold 4 × the largest sub-group (fp32): the whole partition
    # under the default sub_group_size (1e9 elements), a tenth of it here (`ds-train plan` counts both)
    "ZeRO-3, optimizer on NVMe, sub-groups of 1e6": {
        "stage": 3,
        "offload_optimizer": "nvme",
        "ds_config_overrides": {"zero_optimization": {"sub_group_size": 1_000_000}},
    },
    "ZeRO-3, optimizer on CPU": {"stage": 3, "offload_optimizer": "cpu"},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_loop_args(ap, steps=30, seq_len=128)
    ap.add_argument("--nvme-dir", help="directory for the swap files (default: under the temp dir)")
    ap.add_argument("--modes", nargs="*", default=list(MODES), help="a subset of: " + "; ".join(MODES))
    args = ap.parse_args()
    tmp, model, opts = loop_workspace(args, "bench_offload_")
    runs: dict[str, list[dict]] = {m: [] for m in args.modes}
    for r in range(args.repeats):
        order = args.modes[r % len(args.modes) :] + args.modes[: r % len(args.modes)]
        for mode in order:
            name = f"r{r}_{args.modes.index(mode)}"
            cfg = run_config(opts, model, tmp / name, MODES[mode]["stage"], "ds_train")
            cfg["zero"] = dict(MODES[mode])
            if "nvme" in cfg["zero"].values():
                nvme = Path(args.nvme_dir or tmp) / f"{name}_swap"
                nvme.mkdir(parents=True)
                cfg["zero"]["nvme_path"] = str(nvme)
            res = launch_loop(cfg, tmp / f"{name}.yaml", args)
            runs[mode].append(res)
            print(f"repeat {r} {mode}: {res['tokens_per_s']:,.0f} tok/s, peak RSS {res['host_peak_rss_gib']:.2f} GiB, "
                  f"loss {res['loss']:.4f}", flush=True)  # fmt: skip

    def median(mode: str, key: str) -> float:
        return statistics.median(x[key] for x in runs[mode])

    print(f"\n{'mode':<36} {'tok/s':>8} {'vs same stage':>14} {'peak RSS GiB':>13} {'RSS vs same stage':>18}")
    for mode in args.modes:
        ref = f"ZeRO-{MODES[mode]['stage']}"
        ratio = median(mode, "tokens_per_s") / median(ref, "tokens_per_s") if ref in runs else float("nan")
        rss = (
            median(mode, "host_peak_rss_gib") - median(ref, "host_peak_rss_gib")
            if ref in runs
            else float("nan")
        )
        print(f"{mode:<36} {median(mode, 'tokens_per_s'):>8,.0f} {ratio:>13.3f}x "
              f"{median(mode, 'host_peak_rss_gib'):>13.2f} {rss:>+17.3f}")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
