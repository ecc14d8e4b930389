"""Where checkpoints live and how to find the latest complete one, without torch or DeepSpeed.

    <run_dir>/checkpoints/
        latest                    text: the tag of the newest complete checkpoint
        step_00000100/            DeepSpeed files + ds_train_state.json + config.yaml + rng/
                                  + hf_config/ (config.json) + tokenizer/ (tokenizer files)
        step_00000200.partial/    a save in progress (or one that crashed): never loaded

A save is written under `<tag>.partial` and renamed to `<tag>` only when every rank has finished,
then `latest` is replaced atomically. A crash at any moment leaves the previous checkpoint as
`latest`; partial directories are removed by the next save. `latest` is also DeepSpeed's own
pointer file, so `zero_to_fp32.py` and `ds-train convert` find the same checkpoint.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

CHECKPOINTS = "checkpoints"
STATE_FILE = "ds_train_state.json"
CONFIG_FILE = "config.yaml"
HF_CONFIG_DIR = "hf_config"  # config.json (+ generation_config.json) of the model being trained
TOKENIZER_DIR = "tokenizer"  # the run's tokenizer files
LATEST = "latest"
PARTIAL_SUFFIX = ".partial"
UNIVERSAL_SUFFIX = ".universal"  # a copy in DeepSpeed's universal format, for resuming on another world size
TAG_RE = re.compile(r"^step_(\d{8})$")


def tag_for_step(step: int) -> str:
    return f"step_{step:08d}"


@dataclass(frozen=True)
class CheckpointRef:
    root: Path  # the checkpoints/ directory
    tag: str

    @property
    def path(self) -> Path:
        return self.root / self.tag

    @property
    def step(self) -> int:
        m = TAG_RE.match(self.tag)
        return int(m.group(1)) if m else -1

    def state(self) -> dict:
        return read_state(self)


def read_state(ref: CheckpointRef) -> dict:
    """The checkpoint's ds_train_state.json. One that does not parse, or has no integer step (a
    damaged disk, a copy cut short), makes the checkpoint damaged (CheckpointDamaged, one line
    naming it and the one before), never a JSON traceback."""
    try:
        state = json.loads((ref.path / STATE_FILE).read_bytes())
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        problem = f"{STATE_FILE} is not readable JSON: {e}"
    else:
        if isinstance(state, dict) and isinstance(state.get("step"), int):
            return state
        problem = f"{STATE_FILE} holds no step"
    from ds_train.checkpoint.integrity import CheckpointDamaged, damaged_message  # it imports this module

    raise CheckpointDamaged(damaged_message(ref, [problem]))


def recorded_state(tag_dir: str | os.PathLike) -> dict:
    """What ds_train recorded about a checkpoint (its ds_train_state.json), or {} for one saved by
    plain DeepSpeed. Conversion reads it once and passes it down."""
    tag_dir = Path(tag_dir)
    if not (tag_dir / STATE_FILE).is_file():
        return {}
    return read_state(CheckpointRef(tag_dir.parent, tag_dir.name))


def checkpoints_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / CHECKPOINTS


def complete_checkpoints(root: str | os.PathLike) -> list[CheckpointRef]:
    """Complete checkpoints under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    refs = [
        CheckpointRef(root, p.name)
        for p in root.iterdir()
        if p.is_dir() and TAG_RE.match(p.name) and (p / STATE_FILE).is_file()
    ]
    return sorted(refs, key=lambda r: r.step)


def latest_checkpoint(root: str | os.PathLike) -> CheckpointRef | None:
    """The checkpoint `latest` names, or the newest complete one if `latest` is missing or stale."""
    root = Path(root)
    pointer = root / LATEST
    if pointer.is_file():
        tag = pointer.read_text().strip()
        ref = CheckpointRef(root, tag)
        if (ref.path / STATE_FILE).is_file():
            return ref
    refs = complete_checkpoints(root)
    return refs[-1] if refs else None


def resolve_checkpoint(path: str | os.PathLike, tag: str | None = None) -> CheckpointRef:
    """A checkpoint from a run dir, a checkpoints/ dir or a tag directory (+ optional tag)."""
    p = Path(path)
    if tag:
        root = p / CHECKPOINTS if (p / CHECKPOINTS).is_dir() else p
        return CheckpointRef(root, tag)
    if (p / STATE_FILE).is_file() or ((p.parent / LATEST).is_file() and not (p / LATEST).is_file()):
        return CheckpointRef(p.parent, p.name)
    for root in (p / CHECKPOINTS, p):
        ref = latest_checkpoint(root)
        if ref is not None:
            return ref
        if (root / LATEST).is_file():  # a plain DeepSpeed checkpoint dir (no ds_train state)
            return CheckpointRef(root, (root / LATEST).read_text().strip())
    raise FileNotFoundError(f"no checkpoint found under {path}")


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
