"""The chunked, target-only head loss (`model.loss_chunk_tokens`, ds_train/objectives/head_loss.py)
against transformers' full logits: training-step time and peak memory, side by side.

Each case is a model and a micro-batch; each run is one fresh process (so its peak RSS is its own)
that builds the model, collates random rows with the real objective and times forward + backward
of STEPS steps after WARMUP (the optimizer is the same for both and left out). The two variants
alternate, order rotated every repeat; the ratio is of the median step times. The memory autograd
keeps for the backward in one step is counted exactly (saved-tensor hooks; distinct storages,
parameters left out), and so is the step's peak of live tensors (tests/tensor_memory.py: what a
GPU's allocator would report, parameter gradients left out); the process's peak RSS is read from
the kernel.

    .venv/bin/python bench/bench_head_loss.py --repeats 3
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CASES = {
    # the trainer benchmark's model and micro-batch (bench_trainer.py)
    "llama-h256-v4k": {
        "objective": "causal_lm",
        "config": {"model_type": "llama", "hidden_size": 256, "intermediate_size": 704, "num_hidden_layers": 4,
                   "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 4096},
        "micro": 4, "seq": 128,
    },
    # a 32k vocabulary (Llama-2, Mistral) and longer rows: the logits outweigh the model's activations
    "llama-h256-v32k": {
        "objective": "causal_lm",
        "config": {"model_type": "llama", "hidden_size": 256, "intermediate_size": 704, "num_hidden_layers": 2,
                   "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 32768},
        "micro": 4, "seq": 512,
    },
    # all-MiniLM-L6-v2's shape (the demo's fine-tuning model): masked LM predicts 15% of tokens
    "bert-minilm-mlm": {
        "objective": "masked_lm",
        "config": {"model_type": "bert", "hidden_size": 384, "intermediate_size": 1536, "num_hidden_layers": 6,
                   "num_attention_heads": 12, "vocab_size": 30522, "hidden_dropout_prob": 0.0,
                   "attention_probs_dropout_prob": 0.0},
        "micro": 16, "seq": 128,
    },
}  # fmt: skip
VARIANTS = {"full_logits": 0, "chunked": 1024}


def run_one(case: str, chunk: int, steps: int, warmup: int) -> dict:
    """In a fresh process: time STEPS forward+backward steps of CASE with loss_chunk_tokens=CHUNK."""
    import numpy as np
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM

    from ds_train.objectives.causal_lm import CausalLM
    from ds_train.objectives.masked_lm import MaskedLM

    spec = CASES[case]
    raw = dict(spec["config"])
    config = AutoConfig.for_model(raw.pop("model_type"), **raw)
    torch.manual_seed(0)
    if spec["objective"] == "causal_lm":
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
        objective = CausalLM(eos_id=None, loss_chunk_tokens=chunk)
    else:
        model = AutoModelForMaskedLM.from_config(config, attn_implementation="sdpa")
        specials = (0, 1, 2, 3, 4)
        objective = MaskedLM(4, config.vocab_size, specials, seed=0, loss_chunk_tokens=chunk)
    model.config.use_cache = False
    rng = np.random.default_rng(0)
    rows = rng.integers(5, config.vocab_size, (spec["micro"], spec["seq"] + 1)).astype(np.int64)
    batch = objective.collate(rows, np.arange(spec["micro"]))

    def step() -> float:
        model.zero_grad(set_to_none=True)
        loss = objective.loss_sum(model, batch)
        loss.backward()
        return float(loss.detach())

    # What autograd keeps for the backward: distinct storages, parameters left out (they exist anyway)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = step()
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        step()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    # The step's peak of live tensors, exactly (tests/tensor_memory.py), parameter gradients left
    # out: they already exist and the backward accumulates into them, as they are model states
    from tests.tensor_memory import LiveTensorBytes

    model.zero_grad(set_to_none=False)
    with LiveTensorBytes() as meter:
        objective.loss_sum(model, batch).backward()
    return {
        "loss": loss,
        "peak_tensors_mib": meter.peak / 2**20,
        "step_s": statistics.median(times),
        "tokens_per_s": spec["micro"] * spec["seq"] / statistics.median(times),
        "saved_mib": sum(saved.values()) / 2**20,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--out", type=Path, default=REPO / "runs/bench/head_loss.json")
    p.add_argument("--one", nargs=2, metavar=("CASE", "CHUNK"), help=argparse.SUPPRESS)  # a child run
    args = p.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one[0], int(args.one[1]), args.steps, args.warmup)))
        return
    names = list(VARIANTS)
    results: dict = {}
    for case in args.cases:
        runs: dict[str, list[dict]] = {v: [] for v in names}
        for r in range(args.repeats):
            for v in names[r % 2 :] + names[: r % 2]:  # rotate the order every repeat
                cmd = [sys.executable, __file__, "--one", case, str(VARIANTS[v])]
                cmd += ["--steps", str(args.steps), "--warmup", str(args.warmup)]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=REPO).stdout
                runs[v].append(json.loads(out.strip().splitlines()[-1]))
                print(case, v, runs[v][-1], flush=True)
        med = {v: statistics.median(x["step_s"] for x in runs[v]) for v in names}
        results[case] = {
            "runs": runs,
            "speedup": med["full_logits"] / med["chunked"],
            "per_repeat": [f["step_s"] / c["step_s"] for f, c in zip(runs["full_logits"], runs["chunked"])],
            "saved_ratio": runs["chunked"][0]["saved_mib"] / runs["full_logits"][0]["saved_mib"],
            "loss_diff": abs(runs["chunked"][0]["loss"] - runs["full_logits"][0]["loss"]),
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))
    print(
        "\n| case | tokens/step | full logits tok/s | chunked tok/s | speed-up | saved for backward "
        "| peak of live tensors | peak RSS |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for case, r in results.items():
        f, c = r["runs"]["full_logits"], r["runs"]["chunked"]
        tps = {k: statistics.median(x["tokens_per_s"] for x in v) for k, v in r["runs"].items()}
        rss = {k: statistics.median(x["peak_rss_mib"] for x in v) for k, v in r["runs"].items()}
        print(
            f"| {case} | {CASES[case]['micro'] * CASES[case]['seq']} | {tps['full_logits']:,.0f} | "
            f"{tps['chunked']:,.0f} | **{r['speedup']:.2f}×** | {f[0]['saved_mib']:.0f} → {c[0]['saved_mib']:.0f} MiB | "
            f"{f[0]['peak_tensors_mib']:.0f} → {c[0]['peak_tensors_mib']:.0f} MiB | "
            f"{rss['full_logits']:.0f} → {rss['chunked']:.0f} MiB |"
        )


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
