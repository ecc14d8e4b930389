"""What a checkpoint costs the training loop: foreground vs background (`train.save_async`) saves.

Builds the engine as `ds-train pretrain` does, then, REPEATS times with the order rotated, times
STEPS training steps (barrier to barrier, the slowest rank's time) three ways:

  train   the steps alone
  sync    `CheckpointManager.save` (written and hashed before it returns), then the steps
  async   `save(background=True)` (copied to host memory kept from the previous save, as by
          default), then the steps while a thread writes; the save completes at the first step
          whose flag all-reduce says no rank is writing, as in the trainer (or after the last
          step, waiting, if the writes outlast them)
  async_fresh  the same with `train.save_async_keep_memory=false`: each copy into new memory

Every step all-reduces one flag in all three, as the trainer's step does. A save's cost to
training is its system's time minus `train`'s. Prints one JSON line on rank 0.

    python -m torch.distributed.run --nproc_per_node 2 bench/async_save_probe.py RUN.yaml REPEATS DIR STEPS SEQ
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch


def main() -> None:
    from ds_train.distributed.engine import quiet_deepspeed

    quiet_deepspeed()
    import torch.distributed as dist
    from probe_engine import build_probe_engine

    from ds_train.checkpoint.manager import CheckpointManager

    cfg_path, repeats, out = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
    steps, seq = int(sys.argv[4]), int(sys.argv[5])
    built = build_probe_engine(cfg_path)
    ctx, ds_config, engine = built.ctx, built.ds_config, built.engine
    shape = (ds_config["train_micro_batch_size_per_gpu"], seq)
    batch = torch.randint(0, built.hf_config.vocab_size, shape).to(ctx.device)
    manager = CheckpointManager(out, ctx, keep_last=1)
    fresh = CheckpointManager(out / "fresh", ctx, keep_last=1, keep_host_memory=False)
    step_no = 0

    def train_step(k: int, manager: CheckpointManager = manager) -> None:
        for _ in range(ds_config["gradient_accumulation_steps"]):
            engine.backward(engine(input_ids=batch, labels=batch).loss)
            engine.step()
        writing = torch.tensor([float(manager.writing())])
        dist.all_reduce(writing)
        if manager.pending is not None and not writing.item():
            manager.finish()
            completed_after.append(k + 1)

    def run(system: str) -> float:
        nonlocal step_no
        dist.barrier()
        if ctx.rank == 0:
            os.sync()  # the previous system's dirty pages out first
        dist.barrier()
        t0 = time.perf_counter()
        m = fresh if system == "async_fresh" else manager
        if system != "train":
            step_no += 1
            m.save(engine, step_no, {}, "", background=system != "sync")
            dist.barrier()
            stalls[system].append(time.perf_counter() - t0)
        for k in range(steps):
            train_step(k, m)
        if m.pending is not None:  # the writes outlasted the steps: wait for them
            m.finish()
            completed_after.append("waited")
        dist.barrier()
        return time.perf_counter() - t0

    completed_after: list = []  # async: the step after which each save completed, or 'waited'
    train_step(0)  # Adam's moments exist, the files have their real size
    manager.save(engine, 0, {}, "", background=True)  # the kept memory exists, as after a run's first save
    manager.finish()
    times: dict[str, list[float]] = {"train": [], "sync": [], "async": [], "async_fresh": []}
    stalls: dict[str, list[float]] = {"sync": [], "async": [], "async_fresh": []}
    order = list(times)
    for r in range(repeats):
        for system in order[r % len(order) :] + order[: r % len(order)]:
            times[system].append(run(system))
    if ctx.rank == 0:
        size = sum(p.stat().st_size for p in manager.root.rglob("*") if p.is_file())
        print(
            json.dumps(
                {
                    "probe": {
                        "psi": built.psi,
                        "world_size": ctx.world_size,
                        "bytes": size,
                        "steps": steps,
                        "times": times,
                        "stalls": stalls,
                        "completed_after_steps": completed_after,
                    }
                }
            )
        )
    built.zero_ctx.close()


if __name__ == "__main__":
    from process_exit import leave

    main()
    leave()
