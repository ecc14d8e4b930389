"""One rank's model-state memory under ds-train's own engine, for bench_memory.py.

Builds the model and engine exactly as `ds-train pretrain` does (build_model, param_groups,
build_engine, the DeepSpeed JSON from the builder), runs one optimizer step so the optimizer
state exists, then forward + backward of the next step's first micro-batch (accumulation ≥ 2), and
stops there: the moment a rank holds parameters, accumulated gradients and optimizer state at once. Every live tensor storage in the process is
then counted once and attributed to what holds it:

  params     the model's parameters (stage 0), the flat 16/32-bit groups (1-2), ds_tensor partitions (3)
  grads      param.grad and the optimizer's gradient partitions/accumulators
  optimizer  Adam's exp_avg / exp_avg_sq, and the fp32 master copy of the weights
  buffers    communication buckets and other storages the optimizer holds (the paper's "residual
             states"), reported apart from model states

Prints one JSON line per rank (rank 0 collects them).

    python -m torch.distributed.run --nproc_per_node N bench/memory_probe.py RUN.yaml
"""

from __future__ import annotations

import gc
import json
import sys

import torch

MASTER = ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat", "fp32_groups_flat_partition")
BUFFER_HINTS = ("ipg", "bucket", "buffer", "temp", "swap", "extra_large", "padding")


def storage_key(t: torch.Tensor) -> tuple[int, int]:
    s = t.untyped_storage()
    return s.data_ptr(), s.nbytes()


def walk(obj, path: str, out: dict, depth: int = 0, seen: set | None = None) -> None:
    """Attribute path of every tensor reachable from obj (first path wins)."""
    seen = set() if seen is None else seen
    if depth > 6 or id(obj) in seen:
        return
    seen.add(id(obj))
    if torch.is_tensor(obj):
        if obj.device.type != "meta" and obj.untyped_storage().nbytes():
            out.setdefault(storage_key(obj), path)
        return
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    elif hasattr(obj, "__dict__") and type(obj).__module__.startswith(("deepspeed", "torch.optim")):
        items = vars(obj).items()
    else:
        return
    for k, v in items:
        walk(v, f"{path}.{k}" if isinstance(k, str) else path, out, depth + 1, seen)


def classify(path: str) -> str:
    leaf = path.lower()
    # Under ZeRO the wrapped torch optimizer's own params are the fp32 master partition.
    if any(m.lower() in leaf for m in MASTER) or leaf.startswith("optimizer.optimizer.param_groups"):
        return "optimizer"
    if ".state" in leaf and ("exp_avg" in leaf or leaf.endswith(".state")):
        return "optimizer"
    if "grad" in leaf:
        return "grads"
    if any(h in leaf for h in BUFFER_HINTS):
        return "buffers"
    if any(h in leaf for h in ("bit16", "fp16", "bf16", "param", "flat")):
        return "params"
    return "buffers"


def main() -> None:
    from ds_train.distributed.engine import quiet_deepspeed

    quiet_deepspeed()
    from probe_engine import build_probe_engine

    from ds_train.distributed.deepspeed_config import resolve_precision

    built = build_probe_engine(sys.argv[1])
    cfg, ctx, ds_config, hf_config = built.cfg, built.ctx, built.ds_config, built.hf_config
    model, engine, psi, zero_ctx = built.model, built.engine, built.psi, built.zero_ctx
    mb, seq = ds_config["train_micro_batch_size_per_gpu"], int(sys.argv[2]) if len(sys.argv) > 2 else 64
    batch = torch.randint(
        0, hf_config.vocab_size, (mb, seq), generator=torch.Generator().manual_seed(ctx.rank)
    )
    gas = ds_config["gradient_accumulation_steps"]
    if gas < 2:
        raise SystemExit("memory_probe needs gradient accumulation ≥ 2 (global batch ≥ 2 × micro × ranks)")
    for _ in range(gas):  # one full optimizer step: the optimizer state now exists
        engine.backward(engine(input_ids=batch, labels=batch).loss)
        engine.step()
    # The first micro-batch of the next step: gradients are being accumulated, not yet stepped, so
    # the rank holds what it holds between micro-batches (stage 1: the full gradient; 2-3: its part).
    engine.backward(engine(input_ids=batch, labels=batch).loss)
    del batch
    gc.collect()

    owners: dict = {}
    optimizer = engine.optimizer
    walk(getattr(optimizer, "state", {}), "optimizer.state", owners)
    inner = getattr(optimizer, "optimizer", None)
    if inner is not None:
        walk(inner.state, "optimizer.optimizer.state", owners)
    for name, p in model.named_parameters():
        if p.grad is not None:
            owners.setdefault(storage_key(p.grad), f"param.grad:{name}")
        ds_tensor = getattr(p, "ds_tensor", None)
        if ds_tensor is not None:
            owners.setdefault(storage_key(ds_tensor), f"param.ds_tensor:{name}")
        if p.untyped_storage().nbytes():
            owners.setdefault(storage_key(p), f"param:{name}")
    walk(optimizer, "optimizer", owners)

    totals = {"params": 0, "grads": 0, "optimizer": 0, "buffers": 0, "unattributed": 0}
    paths: dict[str, int] = {}
    counted: set = set()
    for obj in gc.get_objects():
        if not torch.is_tensor(obj) or obj.device.type == "meta":
            continue
        key = storage_key(obj)
        if key in counted or not key[1]:
            continue
        counted.add(key)
        path = owners.get(key)
        if path is None:  # not held by the model or optimizer (RoPE caches, autograd leftovers)
            totals["unattributed"] += key[1]
            continue
        kind = classify(path)
        if path.startswith(("param:", "param.ds_tensor:")):
            kind = "params"
        if path.startswith("param.grad:"):
            kind = "grads"
        totals[kind] += key[1]
        bucket = path.split(":")[0].split(".")
        paths[f"{kind} <- {'.'.join(bucket[:3])}"] = (
            paths.get(f"{kind} <- {'.'.join(bucket[:3])}", 0) + key[1]
        )
    record = {
        "rank": ctx.rank,
        "world_size": ctx.world_size,
        "stage": ds_config["zero_optimization"]["stage"],
        "precision": resolve_precision(cfg.train.precision),
        "optimizer_class": type(optimizer).__name__,
        "psi": psi,
        **totals,
        "model_states": totals["params"] + totals["grads"] + totals["optimizer"],
        "by_holder": paths,
    }
    gathered: list = [None] * ctx.world_size
    torch.distributed.all_gather_object(gathered, record)
    if ctx.rank == 0:
        print(json.dumps({"probe": gathered}), flush=True)
    zero_ctx.close()


if __name__ == "__main__":
    from process_exit import leave

    main()
    leave()
