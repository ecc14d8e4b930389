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

from ds_train.checkpoint.layout import (
    STATE_FILE,
    CheckpointRef,
    checkpoints_dir,
    latest_checkpoint,
    resolve_checkpoint,
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
    return _branch_point(run.start_from, run_dir)


def _branch_point(start_from: str, run_dir: Path) -> CheckpointRef:
    try:
        ref = resolve_checkpoint(start_from)
    except (FileNotFoundError, NotADirectoryError):
        raise ConfigError(f"run.start_from: no checkpoint found under {start_from}") from None
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


LINEAGE_FILE = "lineage.json"  # <run_dir>/lineage.json: `lineage` for `ds-train report`, before any save


def write_lineage(run_dir: str | Path, ancestry: list[dict]) -> None:
    """Record a branch's ancestry in its run directory (rank 0, at the branch's first start)."""
    path = Path(run_dir) / LINEAGE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(ancestry, indent=1) + "\n")


def read_lineage(run_dir: str | Path) -> list[dict]:
    """The runs `run_dir` branched off, oldest first ([] for a run started afresh)."""
    path = Path(run_dir) / LINEAGE_FILE
    return json.loads(path.read_text()) if path.is_file() else []


def run_dir_of(ref: CheckpointRef) -> Path:
    """The run directory a checkpoint belongs to (its checkpoints/ directory's parent)."""
    return ref.root.parent if ref.root.name == "checkpoints" else ref.root


def described(ref: CheckpointRef, run_dir: str | Path) -> tuple[str, str]:
    """(where the checkpoint is, what to do instead) for the messages refusing to resume from it."""
    from ds_train.checkpoint.compat import BRANCH_REMEDY, OWN_REMEDY

    if is_own(ref, run_dir):
        return str(run_dir), OWN_REMEDY
    return f"run.start_from's {ref.path}", BRANCH_REMEDY


def start_note(ref: CheckpointRef | None, run_dir: str | Path) -> str:
    """`--check`'s words for where a start begins ("" for a fresh start)."""
    if ref is None:
        return ""
    return f"resumes from {ref.path}" if is_own(ref, run_dir) else f"branches off {ref.path} (run.start_from)"
