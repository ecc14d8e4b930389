"""Resuming on another number of ranks: N-rank ZeRO checkpoints → DeepSpeed's universal format.

A universal checkpoint stores each parameter's fp32 master weights and Adam moments whole, so
DeepSpeed can partition them for any world size when the config says `checkpoint.load_universal`.
We use DeepSpeed's own converter (`deepspeed.checkpoint.ds_to_universal`, in a subprocess so its
worker pools stay isolated) and add ds_train's files (state with the data position, config,
HF config, tokenizer), so the result is a normal ds_train checkpoint that resumes anywhere.
The data position is global (samples consumed), so the resumed run sees the same global batches;
tests check the first losses after an elastic resume against the uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

from ds_train.checkpoint.layout import (
    CONFIG_FILE,
    HF_CONFIG_DIR,
    LATEST,
    STATE_FILE,
    TOKENIZER_DIR,
    UNIVERSAL_SUFFIX,
    CheckpointRef,
    recorded_state,
    write_atomic,
)
from ds_train.checkpoint.nvme_optimizer import LAYOUT_KEY as SWAP_LAYOUT_KEY
from ds_train.convert.to_hf import resolve_tag_dir
from ds_train.convert.zero_layout import CheckpointError, is_universal

log = logging.getLogger(__name__)


def to_universal(tag_dir: Path, out_tag_dir: Path) -> None:
    """DeepSpeed's ds_to_universal on one checkpoint, plus ds_train's own files."""
    recorded = recorded_state(tag_dir)
    if SWAP_LAYOUT_KEY in recorded:
        raise CheckpointError(
            f"{tag_dir} was saved with the optimizer offloaded to NVMe: DeepSpeed's universal format cannot be "
            "made from it (the optimizer files hold empty tensors for the swapped state); resume it on the world "
            "size that saved it, or export the weights with `ds-train convert to-hf`"
        )
    tmp = out_tag_dir.parent / f".{out_tag_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    if is_universal(tag_dir, recorded):  # world-size free already (a reshard of a reshard): a copy
        shutil.copytree(tag_dir, tmp)
        shutil.rmtree(out_tag_dir, ignore_errors=True)
        os.replace(tmp, out_tag_dir)
        return
    cmd = [
        sys.executable,
        "-m",
        "deepspeed.checkpoint.ds_to_universal",
        "--input_folder",
        str(tag_dir),
        "--output_folder",
        str(tmp),
        "--num_extract_workers",
        "1",
        "--num_merge_workers",
        "1",
        "--no_strict",
        "--inject_missing_state",  # plain data-parallel checkpoints carry no tensor-parallel info
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "DS_ACCELERATOR": "cpu"})
    if proc.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tail = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"
        raise CheckpointError(f"converting {tag_dir} to DeepSpeed's universal format failed: {tail}")
    for name in (CONFIG_FILE, HF_CONFIG_DIR, TOKENIZER_DIR):
        src = tag_dir / name
        if src.is_dir():
            shutil.copytree(src, tmp / name)
        elif src.is_file():
            shutil.copy2(src, tmp / name)
    if recorded:
        state = {**recorded, "universal": True, "source_world_size": recorded.get("world_size")}
        state.pop("files", None)  # the universal layout has other files
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
    shutil.rmtree(out_tag_dir, ignore_errors=True)
    os.replace(tmp, out_tag_dir)
    latest_universal = out_tag_dir.parent / "latest_universal"  # written by ds_to_universal
    latest_universal.unlink(missing_ok=True)


def reshard_checkpoint(
    ckpt: str | os.PathLike, out_dir: str | os.PathLike, *, world_size: int, tag: str | None = None
) -> CheckpointRef:
    """Write a checkpoint under `out_dir` (a run's checkpoints/ directory) that resumes on `world_size`
    ranks (in fact on any number: the universal format is world-size free)."""
    if world_size < 1:
        raise CheckpointError("--world-size must be ≥ 1")
    tag_dir = resolve_tag_dir(ckpt, tag)
    if not (tag_dir / STATE_FILE).is_file():
        raise CheckpointError(
            f"{tag_dir} is not a ds_train checkpoint (no {STATE_FILE}); resharding keeps the "
            "data position, which only ds_train checkpoints record"
        )
    out_root = Path(out_dir)
    out_root.mkdir(parents=True, exist_ok=True)
    to_universal(tag_dir, out_root / tag_dir.name)
    write_atomic(out_root / LATEST, tag_dir.name)
    log.info("resharded %s → %s (resumes on %d ranks)", tag_dir, out_root / tag_dir.name, world_size)
    return CheckpointRef(out_root, tag_dir.name)


def needs_universal(state: dict, world_size: int) -> bool:
    """Whether resuming this checkpoint (its ds_train_state.json) on `world_size` ranks needs a
    conversion to the universal format first."""
    if state.get("universal") or state.get("zero_stage", 0) == 0:
        return False  # world-size free already, or full tensors on every rank
    return state.get("world_size") not in (None, world_size)


def elastic_resume(
    ref: CheckpointRef, world_size: int, *, is_main: bool, into: Path | None = None
) -> tuple[CheckpointRef, bool]:
    """(checkpoint to load, whether DeepSpeed must load it as universal) for resuming on `world_size`.

    A checkpoint from another world size is converted once, by rank 0, next to the original, or
    under `into` (a branch's own checkpoints/ directory: another run's is only read), as
    `<tag>.universal`, removed after the next checkpoint completes; ZeRO-0 checkpoints hold full
    tensors and load anywhere as they are. Collective: every rank calls it.
    """
    from ds_train.distributed.engine import broadcast_object

    state = ref.state()
    if state.get("universal"):
        return ref, True
    if not needs_universal(state, world_size):
        return ref, False
    target = CheckpointRef(into or ref.root, ref.tag + UNIVERSAL_SUFFIX)
    result = ("ok", "")
    if is_main:
        log.warning(
            "checkpoint %s was written by %s ranks, this run has %d: converting it to DeepSpeed's "
            "universal format (%s)",
            ref.path,
            state.get("world_size"),
            world_size,
            target.path,
        )
        try:
            if not (target.path / STATE_FILE).is_file():
                target.root.mkdir(parents=True, exist_ok=True)
                to_universal(ref.path, target.path)
        except Exception as e:  # every rank must hear about it rather than wait
            result = ("error", str(e))
    status, message = broadcast_object(result)
    if status == "error":
        raise CheckpointError(message)
    return target, True
