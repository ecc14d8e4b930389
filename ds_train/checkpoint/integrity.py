"""Checksums of checkpoint files: recorded when a checkpoint is completed, checked before it is read.

`ds_train_state.json` carries `files` (relative path → bytes) and `sha256` (relative path → hex
digest) for every file of the checkpoint but itself. Each rank hashes the files it wrote (so the
cost is spread like the writes: sha256 runs at about 0.5-2 GB/s per core, against the 1-20 GB/s a
checkpoint is written at), rank 0 the few small ones it adds. A resume checks sizes on every rank
before anything starts and the checksums split across ranks before DeepSpeed reads a byte.
"""

from __future__ import annotations

import os
from pathlib import Path

from ds_train.checkpoint.layout import LATEST, CheckpointRef, complete_checkpoints
from ds_train.checksum import file_sha256
from ds_train.errors import RunFailure

__all__ = ["CheckpointDamaged", "damaged_message", "digest", "file_sha256", "manifest_problems"]


class CheckpointDamaged(RunFailure):
    """A checkpoint's files differ from its manifest (missing, truncated, altered)."""


def damaged_message(ref: CheckpointRef, problems: list[str], *, own: bool = True) -> str:
    """`own`: a checkpoint of the run being started; otherwise another run's (run.start_from), whose
    `latest` is that run's to move, never the branch's."""
    shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
    older = [r for r in complete_checkpoints(ref.root) if r.step < ref.step]
    if not older:
        hint = "no earlier checkpoint is left"
    elif own:
        hint = f"to resume from the one before, write {older[-1].tag} into {ref.root / LATEST}"
    else:
        hint = f"to branch off the one before, set run.start_from={older[-1].path}"
    return f"checkpoint {ref.path} is damaged ({shown}): refusing to load it; {hint}"


def digest(path: str | os.PathLike) -> tuple[int, str]:
    """(bytes, sha256) of one file."""
    return os.path.getsize(path), file_sha256(path)


def manifest_problems(
    directory: str | os.PathLike, state: dict, *, names: list[str] | None = None, checksums: bool = True
) -> list[str]:
    """What is wrong with the files of the checkpoint in `directory` against its state's manifest
    (missing, wrong size, wrong sha256), limited to `names` when given. Empty when all is well or
    the checkpoint predates the manifest."""
    directory = Path(directory)
    sizes: dict = state.get("files") or {}
    sums: dict = state.get("sha256") or {}
    problems = []
    for name in sorted(sizes) if names is None else names:
        path = directory / name
        if not path.is_file():
            problems.append(f"{name} is missing")
            continue
        size = path.stat().st_size
        if size != sizes[name]:
            problems.append(f"{name} has {size} bytes, the manifest says {sizes[name]}")
        elif checksums and name in sums and file_sha256(path) != sums[name]:
            problems.append(f"{name} does not match its sha256 in the manifest")
    return problems
