"""Loading DeepSpeed checkpoint files without unpickling arbitrary objects.

`torch.load(weights_only=True)` refuses everything but tensors and plain containers. DeepSpeed's
optimizer files also hold a few of its own small objects (the loss scaler, the ZeRO stage enum);
those classes, and nothing else, are allow-listed. With `mmap=True` the tensors stay on disk until
touched, so opening a multi-GB rank file costs almost no memory.
"""

from __future__ import annotations

import enum
import os
from typing import Any

import torch


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or converted, with the file at fault named."""


class _Record:
    """Stands in for a small DeepSpeed object in a checkpoint: its attributes, no behaviour."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({vars(self)})"


class LossScaler(_Record):
    pass


class DynamicLossScaler(_Record):
    pass


class FragmentAddress(_Record):
    pass


class ZeroStageEnum(int, enum.Enum):
    disabled = 0
    optimizer_states = 1
    gradients = 2
    weights = 3


def deepspeed_safe_globals() -> list:
    """The non-tensor classes DeepSpeed writes into checkpoint files, under their DeepSpeed names.

    Local stand-ins rather than DeepSpeed's classes: the unpickler builds inert records (nothing
    of DeepSpeed runs), and the converter does not import DeepSpeed at all (a second saved).
    """
    return [
        (LossScaler, "deepspeed.runtime.fp16.loss_scaler.LossScaler"),
        (DynamicLossScaler, "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler"),
        (ZeroStageEnum, "deepspeed.runtime.zero.config.ZeroStageEnum"),
        (FragmentAddress, "deepspeed.utils.tensor_fragment.fragment_address"),
    ]


def load_checkpoint_file(path: str | os.PathLike, *, mmap: bool = True) -> Any:
    """A DeepSpeed `.pt` file, tensors memory-mapped; raises CheckpointError naming the file if it is
    truncated, corrupt or holds objects outside the allow-list."""
    try:
        with torch.serialization.safe_globals(deepspeed_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise
    except Exception as e:  # torch raises RuntimeError/UnpicklingError/EOFError for bad files
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{path}: cannot be read as a checkpoint file (truncated or corrupt?): {first}"
        ) from None


class FileOffsets:
    """Byte offsets, within their file, of the tensors `torch.load(mmap=True)` returned.

    torch maps the whole file once and each storage is a slice of that mapping, so a storage's
    address minus the mapping's base is its record's offset in the zip archive. The base is found
    from the lowest storage address and the lowest record offset, then every storage is checked
    against the archive's record table.
    """

    def __init__(self, path: str | os.PathLike, loaded: Any):
        self.path = str(path)
        reader = torch._C.PyTorchFileReader(self.path)
        prefix = next((r.split("data/")[0] for r in reader.get_all_records() if "data/" in r), "")
        # Empty storages (ZeRO-3 keeps 0-element placeholders in `module`) have records but no
        # mapped bytes: leave them out, or the lowest offset would not be the lowest storage's.
        offsets = {
            reader.get_record_offset(r)
            for r in reader.get_all_records()
            if r.startswith(f"{prefix}data/") and not r.endswith(".pkl") and reader.get_record_size(r)
        }
        ptrs = {t.untyped_storage().data_ptr() for t in _tensors(loaded) if t.untyped_storage().nbytes()}
        if not ptrs:
            self.base = 0
            return
        self.base = min(ptrs) - min(offsets)
        if any(p - self.base not in offsets for p in ptrs):
            raise ValueError(f"{self.path}: tensor storages do not line up with the archive records")

    def offset(self, tensor: torch.Tensor) -> int:
        if not tensor.is_contiguous():
            raise ValueError(f"{self.path}: a non-contiguous tensor cannot be streamed")
        return (
            tensor.untyped_storage().data_ptr() - self.base + tensor.storage_offset() * tensor.element_size()
        )


def _tensors(obj: Any):
    if torch.is_tensor(obj):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)
    elif hasattr(obj, "__dict__") and not isinstance(obj, type):
        yield from _tensors(vars(obj))
