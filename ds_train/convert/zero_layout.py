"""Where every tensor of a DeepSpeed ZeRO checkpoint lives, read from metadata only.

The plan is a list of `TensorPlan`s: each full tensor is the concatenation of `Piece`s (file, byte
offset, element count), trimmed to its size. Nothing is read but the pickled metadata; the
tensors of the rank files stay memory-mapped and untouched, so planning a 70B checkpoint costs
megabytes.

Layouts (as in DeepSpeed's own zero_to_fp32.py, which reads them into memory instead):
- ZeRO-1/2 (and bf16 at stage 0): per param group, the full fp32 vector is the concatenation of
  every rank's equal-size partition (`single_partition_of_fp32_groups`); parameters follow each
  other in `param_shapes` order, separated by optional alignment paddings.
- ZeRO-3: each rank's flat fp32 groups, concatenated, hold `ceil(numel / W)` elements of every
  parameter in order; a parameter is the concatenation of its slice from every rank, trimmed.
  With the optimizer offloaded to NVMe, a group may instead be a raw swap file beside them.
- ZeRO-0 in fp32: the model-states file holds the full weights (they are the master copy).
- DeepSpeed's universal format (`convert reshard`, an elastic resume): `zero/<name>/fp32.pt` holds
  each parameter's fp32 master weights whole (a bare tensor, flat from ZeRO-3, or `{"param": ...}`);
  the source's model-states files are kept beside them for shapes, buffers and frozen parameters.
Frozen parameters (their fragments) and persistent buffers live in the model-states files in
their own dtypes; tied parameters are listed in `shared_params` and written once.
"""

from __future__ import annotations

import glob
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ds_train.checkpoint.layout import recorded_state
from ds_train.checkpoint.nvme_optimizer import LAYOUT_KEY as SWAP_LAYOUT_KEY
from ds_train.convert.safe_load import CheckpointError, FileOffsets, load_checkpoint_file

__all__ = ["CheckpointError", "ZeroCheckpoint", "read_zero_checkpoint"]

UNIVERSAL_DIR = "zero"  # DeepSpeed's universal format: zero/<parameter name>/{fp32,exp_avg,exp_avg_sq}.pt


@dataclass(frozen=True)
class Piece:
    file: str
    offset: int  # bytes
    numel: int


@dataclass
class TensorPlan:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype  # dtype of the pieces on disk
    pieces: list[Piece]
    kind: str  # "trainable" | "frozen" | "buffer"

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class ZeroCheckpoint:
    path: Path
    stage: int
    world_size: int
    tensors: list[TensorPlan]
    tied: dict[str, str] = field(default_factory=dict)  # alias → the name that is written


def rank_sorted(paths: list[str]) -> list[str]:
    def key(p: str) -> list:
        return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", os.path.basename(p))]

    return sorted(paths, key=key)


def read_zero_checkpoint(tag_dir: str | os.PathLike, recorded: dict | None = None) -> ZeroCheckpoint:
    """Plan the consolidation of the checkpoint in `tag_dir` (the directory holding the rank files).
    `recorded`: its ds_train_state.json if the caller has read it already (read here otherwise)."""
    tag_dir = Path(tag_dir)
    if not tag_dir.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {tag_dir}")
    model_files = rank_sorted(glob.glob(str(tag_dir / "*model_states.pt")))
    optim_files = rank_sorted(glob.glob(str(tag_dir / "*optim_states.pt")))
    if not model_files:
        raise CheckpointError(f"{tag_dir}: no *model_states.pt file (not a DeepSpeed checkpoint?)")
    recorded = recorded_state(tag_dir) if recorded is None else recorded
    _check_recorded_sizes(tag_dir, recorded)

    model0 = load_checkpoint_file(model_files[0])
    if "buffer_names" not in model0 or "module" not in model0:
        raise CheckpointError(f"{model_files[0]}: not a DeepSpeed model-states file")
    stage = int(((model0.get("ds_config") or {}).get("zero_optimization") or {}).get("stage", 0))
    world = int(model0.get("dp_world_size") or 1)
    tied = {alias: src for alias, src in (model0.get("shared_params") or {}).items()}

    if is_universal(tag_dir, recorded):
        if stage == 3:
            _expect_rank_files(tag_dir, model_files, world, "model_states")
        tensors = _plan_universal(tag_dir, model_files, stage)
    elif stage == 3:
        _expect_rank_files(tag_dir, model_files, world, "model_states")
        _expect_rank_files(tag_dir, optim_files, world, "optim_states")
        tensors = _plan_zero3(model_files, optim_files, world, tag_dir, recorded.get(SWAP_LAYOUT_KEY))
    elif optim_files and _has_fp32_partitions(optim_files[0]):
        _expect_rank_files(tag_dir, optim_files, world, "optim_states")
        tensors = _plan_zero12(model_files[0], optim_files)
    else:
        tensors = _plan_full_module(model_files[0], model0)
    return ZeroCheckpoint(path=tag_dir, stage=stage, world_size=world, tensors=tensors, tied=tied)


def is_universal(tag_dir: Path, recorded: dict) -> bool:
    """A checkpoint in DeepSpeed's universal format: per-parameter files under zero/, no rank files
    of optimizer state (ds_train records it; a plain DeepSpeed one is known by its layout)."""
    return bool(recorded.get("universal")) or (not recorded and (Path(tag_dir) / UNIVERSAL_DIR).is_dir())


def universal_fp32(tag_dir: Path, name: str) -> Path:
    """The file of one parameter's fp32 master weights in a universal checkpoint."""
    path = Path(tag_dir) / UNIVERSAL_DIR / name / "fp32.pt"
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (the universal checkpoint has no master weights for {name})")
    return path


def universal_param(loaded, path: Path) -> torch.Tensor:
    """The tensor of a universal `fp32.pt`: saved bare, or as `{"param": tensor, ...}`."""
    tensor = loaded.get("param") if isinstance(loaded, dict) else loaded
    if not torch.is_tensor(tensor):
        raise CheckpointError(f"{path}: holds no parameter tensor")
    return tensor


def _check_recorded_sizes(tag_dir: Path, recorded: dict) -> None:
    """ds_train records every file's size when a checkpoint completes; a shorter file is truncated."""
    for name, size in recorded.get("files", {}).items():
        path = tag_dir / name
        if not name.endswith(".pt") or "rng/" in name:
            continue
        if not path.is_file():
            raise CheckpointError(f"{path}: missing (the checkpoint recorded it, {size} bytes)")
        if path.stat().st_size != size:
            raise CheckpointError(
                f"{path}: truncated or modified ({path.stat().st_size} bytes, recorded {size})"
            )


def _expect_rank_files(tag_dir: Path, files: list[str], world: int, kind: str) -> None:
    if len(files) != world:
        have = ", ".join(os.path.basename(f) for f in files) or "none"
        raise CheckpointError(
            f"{tag_dir}: expected {world} *{kind}.pt rank files (one per rank), found {len(files)}: {have}"
        )
    for r, f in enumerate(files):
        if f"_rank_{r}_" not in os.path.basename(f):
            raise CheckpointError(f"{tag_dir}: the {kind} file of rank {r} is missing")


def _has_fp32_partitions(optim_file: str) -> bool:
    osd = load_checkpoint_file(optim_file).get("optimizer_state_dict", {})
    return "single_partition_of_fp32_groups" in osd


def _open(path: str) -> tuple[dict, FileOffsets]:
    loaded = load_checkpoint_file(path)
    return loaded, FileOffsets(path, loaded)


def _piece(offsets: FileOffsets, tensor: torch.Tensor, start: int, count: int) -> Piece:
    return Piece(offsets.path, offsets.offset(tensor) + start * tensor.element_size(), count)


def _extras(model_file: str, model: dict, offsets: FileOffsets, frozen_pieces) -> list[TensorPlan]:
    """Persistent buffers and frozen parameters, in their own dtypes."""
    out = []
    module = model["module"]
    for name in model.get("buffer_names") or []:
        if name in module:
            t = module[name]
            out.append(
                TensorPlan(name, tuple(t.shape), t.dtype, [_piece(offsets, t, 0, t.numel())], "buffer")
            )
    for name, shape in (model.get("frozen_param_shapes") or {}).items():
        pieces, dtype = frozen_pieces(name)
        out.append(TensorPlan(name, tuple(shape), dtype, pieces, "frozen"))
    return out


def _frozen_pieces(models: list[tuple[dict, FileOffsets]]):
    """name → (pieces, dtype) of a frozen parameter: its fragment in each of `models` (every rank's
    model-states file at ZeRO-3, where it is partitioned; the one file otherwise), concatenated."""

    def frozen(name: str):
        frags = [(m["frozen_param_fragments"][name], o) for m, o in models]
        return [_piece(o, t, 0, t.numel()) for t, o in frags], frags[0][0].dtype

    return frozen


def _plan_full_module(model_file: str, model: dict) -> list[TensorPlan]:
    """ZeRO-0 in fp32: the module's own tensors are the master weights."""
    offsets = FileOffsets(model_file, model)
    buffers = set(model.get("buffer_names") or [])
    plans = []
    for name, t in model["module"].items():
        kind = "buffer" if name in buffers else "trainable"
        plans.append(TensorPlan(name, tuple(t.shape), t.dtype, [_piece(offsets, t, 0, t.numel())], kind))
    return plans


def _plan_universal(tag_dir: Path, model_files: list[str], stage: int) -> list[TensorPlan]:
    models = [_open(f) for f in model_files]
    model0, m_off0 = models[0]
    plans = []
    for group in model0["param_shapes"]:
        for name, shape in group.items():
            path = universal_fp32(tag_dir, name)
            loaded, offsets = _open(str(path))
            tensor = universal_param(loaded, path)
            if tensor.numel() != math.prod(shape):
                raise CheckpointError(
                    f"{path}: {tensor.numel()} elements, the parameter's shape {tuple(shape)} needs {math.prod(shape)}"
                )
            plans.append(
                TensorPlan(
                    name,
                    tuple(shape),
                    tensor.dtype,
                    [_piece(offsets, tensor, 0, tensor.numel())],
                    "trainable",
                )
            )

    # frozen parameters stay where the source stage kept them: in every rank's file at ZeRO-3
    return plans + _extras(
        model_files[0], model0, m_off0, _frozen_pieces(models if stage == 3 else models[:1])
    )


def _plan_zero12(model_file: str, optim_files: list[str]) -> list[TensorPlan]:
    model, m_off = _open(model_file)
    param_shapes = model["param_shapes"]
    ranks = [_open(f) for f in optim_files]
    osd0 = ranks[0][0]["optimizer_state_dict"]
    paddings = osd0.get("param_alignment_paddings")
    plans = []
    for g, shapes in enumerate(param_shapes):
        parts = [(sd["optimizer_state_dict"]["single_partition_of_fp32_groups"][g], off) for sd, off in ranks]
        # DeepSpeed pads each group to a multiple of (alignment × ranks), partitions it evenly and
        # saves each partition without its padding (`group_paddings`, per rank): the rank(s) at
        # the end hold fewer elements. Rank r's partition starts at r × the padded size.
        padded = {
            p.numel() + (sd["optimizer_state_dict"].get("group_paddings") or [0] * (g + 1))[g]
            for (p, _), (sd, _) in zip(parts, ranks)
        }
        if len(padded) != 1:
            raise CheckpointError(f"{optim_files[0]}: ranks hold partitions of different sizes for group {g}")
        size = padded.pop()
        cursor = 0
        for i, (name, shape) in enumerate(shapes.items()):
            numel = math.prod(shape)
            pieces = []
            lo, hi = cursor, cursor + numel
            for r in range(lo // size, (hi - 1) // size + 1 if numel else lo // size):
                if r >= len(parts):
                    raise CheckpointError(
                        f"{optim_files[0]}: parameter group {g} needs {hi} elements, "
                        f"the ranks hold {sum(p.numel() for p, _ in parts)}"
                    )
                tensor, off = parts[r]
                a, b = max(lo, r * size), min(hi, (r + 1) * size)
                if b - r * size > tensor.numel():
                    raise CheckpointError(
                        f"{optim_files[0]}: {name} reaches into rank {r}'s padding of group {g}"
                    )
                pieces.append(_piece(off, tensor, a - r * size, b - a))
            plans.append(TensorPlan(name, tuple(shape), parts[0][0].dtype, pieces, "trainable"))
            cursor = hi + (paddings[g][i] if paddings is not None else 0)

    return plans + _extras(model_file, model, m_off, _frozen_pieces([(model, m_off)]))


def _plan_zero3(
    model_files: list[str], optim_files: list[str], world: int, tag_dir: Path, swapped: list[dict] | None
) -> list[TensorPlan]:
    models = [_open(f) for f in model_files]
    model0, m_off0 = models[0]
    shapes: dict[str, torch.Size] = {}
    for group in model0["param_shapes"]:
        shapes.update(group)
    ranks, dtype = [], torch.float32
    for r, f in enumerate(optim_files):
        sd, off = _open(f)
        flats = sd["optimizer_state_dict"]["fp32_flat_groups"]
        ranks.append(_segments(flats, off, swapped, tag_dir / "offloaded_tensors" / f"rank{r:02d}"))
        dtype = flats[0].dtype
    total = sum(seg.numel for seg in ranks[0])
    plans, cursor = [], 0
    for name, shape in shapes.items():
        numel = math.prod(shape)
        per_rank = math.ceil(numel / world)
        pieces = []
        for segments in ranks:
            pieces.extend(_flat_range(segments, cursor, per_rank))
        plans.append(TensorPlan(name, tuple(shape), dtype, pieces, "trainable"))
        cursor += per_rank
    if cursor != total:
        hint = (
            ""
            if swapped
            else " (an optimizer swapped to NVMe by plain DeepSpeed? ds-train records where the swapped parts are)"
        )
        raise CheckpointError(
            f"{optim_files[0]}: parameters need {cursor} elements per rank, the file holds {total}{hint}"
        )

    return plans + _extras(model_files[0], model0, m_off0, _frozen_pieces(models))


@dataclass(frozen=True)
class _Segment:
    """One flat fp32 group of a rank: a tensor inside its optimizer file, or a raw swap file."""

    file: str
    offset: int  # bytes
    numel: int
    itemsize: int

    def piece(self, start: int, count: int) -> Piece:
        return Piece(self.file, self.offset + start * self.itemsize, count)


def _segments(
    flats: list[torch.Tensor], offsets: FileOffsets, swapped: list | None, swap_dir: Path
) -> list[_Segment]:
    """A rank's flat groups in order. With NVMe optimizer offload, a swapped group's tensor in the
    optimizer file is empty; its master weights are a raw fp32 file DeepSpeed copied into the
    checkpoint (`offloaded_tensors/rankNN/<ds_id>.tensor.swp`, padded for direct I/O), whose name and
    size ds-train recorded at save (checkpoint/nvme_optimizer.py)."""
    if swapped is not None and len(swapped) != len(flats):
        raise CheckpointError(
            f"{offsets.path}: {len(flats)} optimizer sub-groups, the checkpoint recorded {len(swapped)}"
        )
    out = []
    for g, t in enumerate(flats):
        entry = swapped[g] if swapped is not None else None
        if entry is None or entry["swap_file"] is None:
            out.append(_Segment(offsets.path, offsets.offset(t), t.numel(), t.element_size()))
            continue
        path = swap_dir / entry["swap_file"]
        need = entry["numel"] * t.element_size()
        if not path.is_file() or path.stat().st_size < need:
            raise CheckpointError(
                f"{path}: missing or shorter than the {need} bytes of optimizer sub-group {g}"
            )
        out.append(_Segment(str(path), 0, entry["numel"], t.element_size()))
    return out


def _flat_range(segments: list[_Segment], lo: int, count: int) -> list[Piece]:
    """Pieces covering [lo, lo + count) of one rank's concatenated flat groups."""
    pieces, hi, start = [], lo + count, 0
    for seg in segments:
        a, b = max(lo, start), min(hi, start + seg.numel)
        if a < b:
            pieces.append(seg.piece(a - start, b - a))
        start += seg.numel
    return pieces
