"""Which checkpoint a start loads: the run's own latest, or, before it has one, `run.start_from`.

`run.start_from` branches a new run off another run's checkpoint with everything a resume restores
(weights, optimizer, LR schedule position, data position, RNG): the decay phase of a WSD schedule
taken from a stable-phase checkpoint, or an ablation sharing a prefix, as OLMo-core's `load_path`,
torchtitan's `initial_load_path` and Megatron's `--load` separate from `--save` do. Once the new run
has saved, it resumes from its own checkpoints: a requeued job never branches off again. The other
run's directory is only read (a conversion to another world size goes under this run's
checkpoints/).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

from ds_train.checkpoint.layout import (
    CHECKPOINTS,
    STATE_FILE,
    CheckpointRef,
    checkpoints_dir,
    complete_checkpoints,
    latest_checkpoint,
    resolve_checkpoint,
    write_atomic,
)
from ds_train.config import ConfigError
from ds_train.config.schema import RunSection


def start_point(run: RunSection) -> CheckpointRef | None:
    """The checkpoint this start resumes from (None: a fresh start); ConfigError (one line) when
    run.resume, or run.start_from, says otherwise."""
    run_dir = Path(run.output_dir)
    own = latest_checkpoint(checkpoints_dir(run_dir))
    if own is not None and run.resume == "never":
        raise ConfigError(
            f"{run_dir} already holds checkpoints (latest: step {own.step}) and run.resume=never"
        )
    if own is not None or not run.start_from:
        if own is None and run.resume == "require":
            raise ConfigError(f"run.resume=require but {run_dir} holds no complete checkpoint")
        return own
    return _pinned(run_dir, run.start_from) or _branch_point(run.start_from, run_dir)


def _pinned(run_dir: Path, start_from: str) -> CheckpointRef | None:
    """The branch point an earlier attempt of this run chose for the same run.start_from (killed
    before its first save): a run directory's latest may have moved on since, and the branch
    must not restart from another step."""
    record = _lineage_record(run_dir)
    same = record.get("start_from") and Path(record["start_from"]).resolve() == Path(start_from).resolve()
    if not same or not record.get("lineage"):  # (resolved: a trailing slash or a symlink is the same)
        return None
    path = Path(record["lineage"][-1]["checkpoint"])
    ref = CheckpointRef(path.parent, path.name)
    if not (ref.path / STATE_FILE).is_file():
        raise ConfigError(
            f"run.start_from: {ref.path}, the checkpoint this run branched off at its first start, is gone "
            f"(pruned or moved); point run.start_from at another checkpoint (a step directory) to branch anew"
        )
    return ref


def _branch_point(start_from: str, run_dir: Path) -> CheckpointRef:
    try:
        ref = resolve_checkpoint(start_from)
    except (FileNotFoundError, NotADirectoryError):
        raise ConfigError(f"run.start_from: no checkpoint found under {start_from}") from None
    if not ref.path.is_dir():  # a step directory that is gone (pruned by keep_last, say)
        left = ", ".join(r.tag for r in complete_checkpoints(ref.root)) or "none"
        raise ConfigError(f"run.start_from: no checkpoint {ref.path}; complete ones there: {left}")
    if not (ref.path / STATE_FILE).is_file():
        raise ConfigError(
            f"run.start_from: {ref.path} is not a complete ds-train checkpoint (no {STATE_FILE}; a plain "
            "DeepSpeed checkpoint or a save that did not finish): export its weights with `ds-train convert "
            "to-hf` and start from them with model.init_from"
        )
    if is_own(ref, run_dir):
        raise ConfigError(
            f"run.start_from names {ref.path}, a checkpoint of this run.output_dir: a run resumes from its own "
            "latest checkpoint by itself; to branch off one of its checkpoints, give the new branch another "
            "run.output_dir"
        )
    return ref


def is_own(ref: CheckpointRef, run_dir: str | Path) -> bool:
    """Whether `ref` is one of `run_dir`'s own checkpoints (not another run's, from run.start_from)."""
    return ref.root.resolve() == checkpoints_dir(run_dir).resolve()


def own_step(ref: CheckpointRef | None, run_dir: str | Path) -> int | None:
    """The step of the run's own checkpoint that a start resumes from; None for a fresh start and
    for a branch off another run (it has no checkpoint of its own yet)."""
    return ref.step if ref is not None and is_own(ref, run_dir) else None


def lineage(state: dict, ref: CheckpointRef, run_dir: str | Path) -> list[dict]:
    """The runs this one branched off, oldest first (ds_train_state.json's `lineage`), each as
    {"checkpoint": path, "step": step, "run_dir": its run}: the checkpoint's own lineage, and the checkpoint itself when
    this start branches off it."""
    inherited = list(state.get("lineage") or [])
    if is_own(ref, run_dir):
        return inherited
    entry = {
        "checkpoint": str(ref.path.resolve()),
        "step": ref.step,
        "run_dir": str(run_dir_of(ref).resolve()),
    }
    return [*inherited, entry]


# <run_dir>/lineage.json: the branch point, pinned before the first load (a requeue before the first
# save branches off the same checkpoint), and the lineage for `ds-train report`
LINEAGE_FILE = "lineage.json"


def write_lineage(run_dir: str | Path, start_from: str, ancestry: list[dict]) -> None:
    """Record a branch's run.start_from and ancestry in its run directory (rank 0, before it loads
    the branch point)."""
    path = Path(run_dir) / LINEAGE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps({"start_from": start_from, "lineage": ancestry}, indent=1) + "\n")


def _lineage_record(run_dir: str | Path) -> dict:
    path = Path(run_dir) / LINEAGE_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def read_lineage(run_dir: str | Path) -> list[dict]:
    """The runs `run_dir` branched off, oldest first ([] for a run started afresh)."""
    return _lineage_record(run_dir).get("lineage", [])


def run_dir_of(ref: CheckpointRef) -> Path:
    """The run directory a checkpoint belongs to (its checkpoints/ directory's parent)."""
    return ref.root.parent if ref.root.name == CHECKPOINTS else ref.root


class Described(NamedTuple):
    """How the messages refusing to resume from a checkpoint name it and the way out."""

    where: str  # the checkpoint: the run directory, or run.start_from's path
    remedy: str  # what to do instead of resuming (check_resume)
    instead: str  # what to start instead of continuing on other data (check_data_resume)


def described(ref: CheckpointRef, run_dir: str | Path) -> Described:
    from ds_train.checkpoint.compat import BRANCH_REMEDY, OWN_REMEDY

    if is_own(ref, run_dir):
        return Described(str(run_dir), OWN_REMEDY, "start a new run.output_dir")
    return Described(f"run.start_from's {ref.path}", BRANCH_REMEDY, "start afresh without run.start_from")


def start_note(ref: CheckpointRef | None, run_dir: str | Path) -> str:
    """`--check`'s words for where a start begins ("" for a fresh start)."""
    if ref is None:
        return ""
    return f"resumes from {ref.path}" if is_own(ref, run_dir) else f"branches off {ref.path} (run.start_from)"
