"""One engine, two checkpoint writers and readers, for bench_checkpoint.py.

Builds the model and engine as `ds-train pretrain` does, runs one optimizer step (so Adam's
moments exist and the files have their real size), then, REPEATS times in alternating order:

  bare save   `engine.save_checkpoint(dir, tag)`: DeepSpeed alone, what a bare loop does
  ds save     `CheckpointManager.save`: the same engine call plus ds-train's integrity work
              (each rank's files hashed, the manifest, the atomic rename of `step_N.partial/`)
  bare load   `engine.load_checkpoint(dir, tag)`
  ds load     `CheckpointManager.verify` (sizes and sha256 of every file, split across ranks)
              + `CheckpointManager.load` (DeepSpeed's reader with weights_only unpickling)

Each is timed from a barrier to a barrier (the slowest rank's time: what the job waits for),
after `sync` has written out the previous one's dirty pages.
`--drop-caches` empties the page cache before each load (root only): the reads then come from
the disk, as on a fresh node after a requeue. Prints one JSON line on rank 0.

    python -m torch.distributed.run --nproc_per_node 2 bench/checkpoint_probe.py RUN.yaml REPEATS DIR [--drop-caches]
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch


def _bytes_under(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    from ds_train.distributed.engine import quiet_deepspeed

    quiet_deepspeed()
    import torch.distributed as dist
    from probe_engine import build_probe_engine

    from ds_train.checkpoint.layout import latest_checkpoint
    from ds_train.checkpoint.manager import CheckpointManager

    cfg_path, repeats, out = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
    drop_caches = "--drop-caches" in sys.argv[4:]
    built = build_probe_engine(cfg_path)
    ctx, ds_config, engine = built.ctx, built.ds_config, built.engine
    batch = torch.randint(0, built.hf_config.vocab_size, (ds_config["train_micro_batch_size_per_gpu"], 32))
    for _ in range(ds_config["gradient_accumulation_steps"]):
        engine.backward(engine(input_ids=batch, labels=batch).loss)
        engine.step()

    def timed(fn) -> float:
        # Start each from a clean page cache state: dirty pages of the previous write, flushed
        # while the next one runs, would throttle whichever system comes second.
        dist.barrier()
        if ctx.rank == 0:
            os.sync()
            if drop_caches and fn.__name__.endswith("load"):
                Path("/proc/sys/vm/drop_caches").write_text("3\n")
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        dist.barrier()
        return time.perf_counter() - t0

    manager = CheckpointManager(out / "ds", ctx, keep_last=1)
    bare_dir = out / "bare"
    times: dict[str, list[float]] = {"bare_save": [], "ds_save": [], "bare_load": [], "ds_load": []}
    for r in range(repeats):
        tag = f"r{r}"

        def bare_save(tag: str = tag) -> None:
            engine.save_checkpoint(str(bare_dir), tag=tag, client_state={}, save_latest=False)

        def ds_save(r: int = r) -> None:
            manager.save(engine, r + 1, {}, "")

        def bare_load(tag: str = tag) -> None:
            engine.load_checkpoint(str(bare_dir), tag=tag, load_optimizer_states=True)

        def ds_load() -> None:
            ref = latest_checkpoint(manager.root)
            manager.verify(ref, ref.state())
            manager.load(engine, ref)

        saves = (bare_save, ds_save) if r % 2 == 0 else (ds_save, bare_save)
        loads = (bare_load, ds_load) if r % 2 == 0 else (ds_load, bare_load)
        for fn in (*saves, *loads):
            times[fn.__name__].append(timed(fn))
        if ctx.rank == 0:
            # Each system keeps its latest checkpoint (ds-train's keep_last=1 deletes the older one
            # inside its save, which its time includes): every save after the first then runs
            # with the same two checkpoints on the file system, whichever system goes first.
            shutil.rmtree(bare_dir / f"r{r - 1}", ignore_errors=True)
        dist.barrier()
    if ctx.rank == 0:  # the last repeat's checkpoints are both still there
        sizes = {
            "bare": _bytes_under(bare_dir / f"r{repeats - 1}"),
            "ds": _bytes_under(latest_checkpoint(manager.root).path),
        }
        print(
            json.dumps(
                {"probe": {"psi": built.psi, "world_size": ctx.world_size, "bytes": sizes, "times": times}}
            )
        )
    built.zero_ctx.close()


if __name__ == "__main__":
    from process_exit import leave

    main()
    leave()
