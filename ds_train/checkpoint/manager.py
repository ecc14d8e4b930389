"""Save and load training checkpoints through the DeepSpeed engine (see layout.py for the format)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ds_train.checkpoint.layout import (
    CONFIG_FILE,
    LATEST,
    PARTIAL_SUFFIX,
    STATE_FILE,
    UNIVERSAL_SUFFIX,
    CheckpointRef,
    checkpoints_dir,
    complete_checkpoints,
    tag_for_step,
    write_atomic,
)
from ds_train.distributed.engine import DistributedContext, all_gather_object, barrier

log = logging.getLogger(__name__)


class CheckpointManager:
    def __init__(self, run_dir: str | os.PathLike, ctx: DistributedContext, keep_last: int):
        self.root = checkpoints_dir(run_dir)
        self.ctx = ctx
        self.keep_last = keep_last

    def save(
        self,
        engine: Any,
        step: int,
        state: dict,
        config_yaml: str,
        write_extras: Callable[[Path], None] | None = None,
    ) -> CheckpointRef:
        """Write a checkpoint for `step` on all ranks; it becomes `latest` only once complete.

        `write_extras(dir)` runs on rank 0 inside the checkpoint directory before it is completed
        (the HF model config and the tokenizer, so a checkpoint converts without the run config)."""
        t0 = time.time()
        tag = tag_for_step(step)
        partial = tag + PARTIAL_SUFFIX
        if self.ctx.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            self._remove_partials()
            if (self.root / tag).exists():  # the same step saved before (e.g. end after a periodic save)
                shutil.rmtree(self.root / tag)
        barrier()
        engine.save_checkpoint(str(self.root), tag=partial, client_state={}, save_latest=False)
        rng_dir = self.root / partial / "rng"
        rng_dir.mkdir(parents=True, exist_ok=True)
        torch.save(_rng_state(), rng_dir / f"rank_{self.ctx.rank:05d}.pt")
        # Every rank reports success; a rank that failed raises before this and the others time out.
        all_gather_object(True)
        if self.ctx.is_main:
            files = {
                str(p.relative_to(self.root / partial)): p.stat().st_size
                for p in sorted((self.root / partial).rglob("*"))
                if p.is_file()
            }
            full_state = {
                **state,
                "step": step,
                "tag": tag,
                "world_size": self.ctx.world_size,
                "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "files": files,
            }
            (self.root / partial / CONFIG_FILE).write_text(config_yaml)
            if write_extras is not None:
                write_extras(self.root / partial)
            write_atomic(self.root / partial / STATE_FILE, json.dumps(full_state, indent=1))
            os.replace(self.root / partial, self.root / tag)
            write_atomic(self.root / LATEST, tag)
            self._prune()
        barrier()
        log.info("checkpoint %s written in %.1fs", self.root / tag, time.time() - t0)
        return CheckpointRef(self.root, tag)

    def load(self, engine: Any, ref: CheckpointRef) -> dict:
        """Restore engine, optimizer, LR schedule and (same world size) this rank's RNG."""
        load_path, _ = engine.load_checkpoint(
            str(ref.root),
            tag=ref.tag,
            load_module_strict=True,
            load_optimizer_states=True,
            load_lr_scheduler_states=True,
        )
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint {ref.path}")
        state = ref.state()
        rng_file = ref.path / "rng" / f"rank_{self.ctx.rank:05d}.pt"
        if state.get("world_size") == self.ctx.world_size and rng_file.is_file():
            _set_rng_state(torch.load(rng_file, weights_only=True))
        return state

    def _remove_partials(self) -> None:
        for p in self.root.glob(f"*{PARTIAL_SUFFIX}"):
            log.warning("removing incomplete checkpoint %s (a save that did not finish)", p)
            shutil.rmtree(p, ignore_errors=True)

    def _prune(self) -> None:
        refs = complete_checkpoints(self.root)
        for ref in refs[: max(0, len(refs) - self.keep_last)]:
            shutil.rmtree(ref.path, ignore_errors=True)
        # A universal copy made to resume on another world size is not needed once this run has
        # written a checkpoint of its own.
        for p in self.root.glob(f"*{UNIVERSAL_SUFFIX}"):
            shutil.rmtree(p, ignore_errors=True)


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
