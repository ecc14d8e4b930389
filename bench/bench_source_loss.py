"""What a mixture's per-source training loss (`loss/<name>`, ds_train/train/source_losses.py)
costs a training step: the objective's forward + backward with and without `train_sources`, side
by side in one process, alternating, through the chunked head (the default) and from full logits.

The sums come from the per-token values the loss is made of: one `index_add` of `chunk` values per
chunk of the head (full logits: one over every position), next to a `[chunk, vocab]` matmul.

    .venv/bin/python bench/bench_source_loss.py --repeats 5
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def timed_steps(model, objective, batch: dict, steps: int) -> float:
    """Seconds per forward + backward of `objective`'s loss."""
    t0 = time.perf_counter()
    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        objective.loss_sum(model, dict(batch)).backward()
    return (time.perf_counter() - t0) / steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--sources", type=int, default=4)
    args = p.parse_args()

    import numpy as np
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from bench.bench_head_loss import CASES
    from ds_train.objectives.causal_lm import CausalLM

    torch.set_num_threads(2)
    print("| case | loss | without tok/s | with per-source sums tok/s | ratio (with / without) |")
    print("|---|---|---|---|---|")
    for case in ("llama-h256-v4k", "llama-h256-v32k"):
        spec = CASES[case]
        raw = dict(spec["config"])
        config = AutoConfig.for_model(raw.pop("model_type"), **raw)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
        model.config.use_cache = False
        rows = np.random.default_rng(0).integers(5, config.vocab_size, (spec["micro"], spec["seq"] + 1))
        for chunk, name in ((1024, "chunked head"), (0, "full logits")):
            plain = CausalLM(eos_id=None, loss_chunk_tokens=chunk)
            mixture = dataclasses.replace(plain, train_sources=args.sources)
            batch = plain.collate(rows, np.arange(len(rows)))
            batch["source"] = torch.arange(len(rows)) % args.sources

            timed_steps(model, plain, batch, 2), timed_steps(model, mixture, batch, 2)  # warm-up
            times = {"plain": [], "mixture": []}
            for r in range(args.repeats):
                order = [("plain", plain), ("mixture", mixture)][:: 1 if r % 2 == 0 else -1]
                for key, objective in order:
                    times[key].append(timed_steps(model, objective, batch, args.steps))
            med = {k: statistics.median(v) for k, v in times.items()}
            tokens = spec["micro"] * spec["seq"]
            print(
                f"| {case} | {name} | {tokens / med['plain']:,.0f} | {tokens / med['mixture']:,.0f} | "
                f"**{med['plain'] / med['mixture']:.3f}×** |",
                flush=True,
            )


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
