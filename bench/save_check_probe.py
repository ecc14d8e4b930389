"""Background checkpoints (`train.save_async`) on this machine's device: the same contents as a
foreground save's, and they resume the same state. Exact checks, no timing.

On CPU the distributed tests compare the files byte for byte; on a GPU the copy goes through
host memory kept between saves and each storage's device tag differs (`cpu` against
`cuda:0`), so this compares what the files hold instead, then loads each into the engine:

  1. train 2 steps; save step 2 in the foreground (run F) and in the background (run B); every
     file's tensors and objects equal;
  2. train 2 more; save step 4 both ways again (B's copy reuses the memory kept from step 2);
  3. train 2 more (the engine moves on), load F's step 4 and record the engine's state (weights and
     the optimizer's state dict), load B's step 4 and record it again: equal;
  4. one training step from each load: the same loss.

Prints one JSON line on rank 0 ({"probe": {..., "ok": bool}}); exits 1 if a check fails. Run by
`bench/bench_async_save.py --check` (REPEATS is unused; the runner's common arguments):

    python -m torch.distributed.run --nproc_per_node 1 bench/save_check_probe.py RUN.yaml REPEATS OUT_DIR SEQ
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch


def same(a: Any, b: Any, where: str, diffs: list[str]) -> None:
    """Recursively compare loaded checkpoint contents; note where they differ."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.dtype != b.dtype or a.shape != b.shape or not torch.equal(a.cpu(), b.cpu()):
            diffs.append(where)
    elif isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            diffs.append(f"{where}: keys")
        for k in a.keys() & b.keys():
            same(a[k], b[k], f"{where}/{k}", diffs)
    elif isinstance(a, list | tuple) and isinstance(b, list | tuple):
        if len(a) != len(b):
            diffs.append(f"{where}: length")
        for i, (x, y) in enumerate(zip(a, b, strict=False)):
            same(x, y, f"{where}[{i}]", diffs)
    elif type(a) is not type(b) or (not hasattr(a, "__dict__") and a != b):
        diffs.append(where)


def main() -> bool:
    from ds_train.distributed.engine import quiet_deepspeed

    quiet_deepspeed()
    import torch.distributed as dist
    from probe_engine import build_probe_engine

    from ds_train.checkpoint.layout import latest_checkpoint
    from ds_train.checkpoint.manager import CheckpointManager

    cfg_path, out, seq = sys.argv[1], Path(sys.argv[3]), int(sys.argv[4])
    built = build_probe_engine(cfg_path)
    ctx, ds_config, engine = built.ctx, built.ds_config, built.engine
    gen = torch.Generator().manual_seed(ctx.rank)
    shape = (ds_config["train_micro_batch_size_per_gpu"], seq)
    batches = [torch.randint(0, built.hf_config.vocab_size, shape, generator=gen) for _ in range(8)]
    foreground = CheckpointManager(out / "foreground", ctx, keep_last=2)
    background = CheckpointManager(out / "background", ctx, keep_last=2)
    results: dict[str, Any] = {"device": str(ctx.device), "world_size": ctx.world_size}

    def train_step(k: int) -> float:
        batch = batches[k % len(batches)].to(ctx.device)
        loss = engine(input_ids=batch, labels=batch).loss
        engine.backward(loss)
        engine.step()
        return float(loss)

    def compare_files(step: int) -> list[str]:
        f = latest_checkpoint(foreground.root)
        b = latest_checkpoint(background.root)
        assert f.step == b.step == step, (f, b)
        diffs: list[str] = []
        names = sorted(p.relative_to(f.path) for p in f.path.rglob("*.pt"))
        for name in names:
            a = torch.load(f.path / name, map_location="cpu", weights_only=False)
            c = torch.load(b.path / name, map_location="cpu", weights_only=False)
            same(a, c, str(name), diffs)
        results[f"files_step_{step}"] = len(names)
        return diffs

    def engine_state() -> dict:
        return {
            "module": {k: v.detach().float().cpu().clone() for k, v in engine.module.state_dict().items()},
            "optimizer": torch.utils._pytree.tree_map(
                lambda x: x.detach().cpu().clone() if isinstance(x, torch.Tensor) else x,
                engine.optimizer.state_dict(),
            ),
        }

    k = 0
    for step in (2, 4):
        while k < step:
            train_step(k)
            k += 1
        foreground.save(engine, step, {}, "")
        background.save(engine, step, {}, "", background=True)
        background.finish()
        results[f"diffs_step_{step}"] = compare_files(step)
    results["host_memory_kept_bytes"] = background.host_memory.kept_bytes()
    train_step(k)
    train_step(k + 1)  # the engine has moved on from step 4
    foreground.load(engine, latest_checkpoint(foreground.root))
    from_foreground = engine_state()
    loss_f = train_step(4)
    background.load(engine, latest_checkpoint(background.root))
    from_background = engine_state()
    loss_b = train_step(4)
    diffs: list[str] = []
    same(from_foreground, from_background, "engine", diffs)
    results["diffs_loaded"] = diffs
    results["loss_after_load"] = {"foreground": loss_f, "background": loss_b}
    ok = not any(results[f"diffs_step_{s}"] for s in (2, 4)) and not diffs and loss_f == loss_b
    dist.barrier()
    if ctx.rank == 0:
        print(json.dumps({"probe": {**results, "ok": ok}}), flush=True)
    built.zero_ctx.close()
    return ok


if __name__ == "__main__":
    from process_exit import leave

    leave(0 if main() else 1)
