"""ds-train's hooks into DeepSpeed's checkpoint writer and reader (`engine.checkpoint_engine`).

Writing: every file DeepSpeed saves is hashed as its bytes go out (no read-back), and with
train.save_async copied to host memory and written by a background thread (background.py).
Reading: DeepSpeed's `torch.load(weights_only=False)` is replaced by `weights_only=True` with an
allow-list of the few DeepSpeed classes its files hold.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch

from ds_train.checkpoint.background import BackgroundWriter, host_snapshot
from ds_train.checkpoint.integrity import CheckpointDamaged
from ds_train.checksum import HashingWriter


@contextlib.contextmanager
def hashed_writes(
    engine: Any, written: dict[Path, tuple[int, str] | None], background: BackgroundWriter | None = None
):
    """Note every file DeepSpeed's checkpoint writer saves on this rank, with its (bytes, sha256)
    taken as the bytes go out when the writer is DeepSpeed's default (`torch.save` to a zip file),
    so no file is read back to hash it; files of other writers (DeepSpeed's asynchronous ones,
    legacy serialization) are noted as None and hashed after they are written. With `background`
    (default writer only), each state dict is copied to host memory and written by its thread."""
    writer = getattr(engine, "checkpoint_engine", None)
    if writer is None or not hasattr(writer, "save"):
        yield
        return
    original = writer.save
    streams = is_plain_torch_writer(engine)

    stop = background.abandoned if background is not None else None

    def write(state_dict, path, *args, **kwargs):
        # torch.save writes a zip to a file object front to back (no seek); the archive's inner
        # folder is then named "archive" instead of after the file, which torch.load ignores.
        with open(path, "wb") as raw, HashingWriter(raw, overlap=True, stop=stop) as sink:
            result = original(state_dict, sink, *args, **kwargs)
        written[Path(path)] = (sink.size, sink.hexdigest())
        return result

    def save(state_dict, path, *args, **kwargs):
        if not streams:
            result = original(state_dict, path, *args, **kwargs)
            written[Path(path)] = None
            return result
        if background is None:
            return write(state_dict, path, *args, **kwargs)
        try:
            snapshot = host_snapshot(state_dict, memory=background.memory)  # before training changes it
        except (RuntimeError, MemoryError) as e:  # host memory: failed on every rank at completion,
            background.fail(e)  # not on this rank alone inside DeepSpeed's save (its peers go on)
            return None
        background.submit(lambda: write(snapshot, path, *args, **kwargs))
        return None

    with _patched(writer, "save", save):
        yield


def is_plain_torch_writer(engine: Any) -> bool:
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    writer = getattr(engine, "checkpoint_engine", None)
    return type(writer) is TorchCheckpointEngine and bool(getattr(writer, "zipfile_serialization", False))


@contextlib.contextmanager
def safe_loading(engine: Any):
    """DeepSpeed's checkpoint reader, with torch.load(weights_only=True) and an allow-list instead
    of unrestricted unpickling."""
    reader = getattr(engine, "checkpoint_engine", None)
    if reader is None or not hasattr(reader, "load"):
        yield
        return
    allowed = _deepspeed_classes()

    def load(path, map_location=None, *args, **kwargs):
        try:
            with torch.serialization.safe_globals(allowed):
                return torch.load(path, map_location=map_location, weights_only=True)
        except FileNotFoundError:
            raise
        except Exception as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise CheckpointDamaged(
                f"{path}: refused to load ({first}); ds_train reads checkpoints with "
                "torch.load(weights_only=True) and never unpickles other objects"
            ) from None

    with _patched(reader, "load", load):
        yield


def _deepspeed_classes() -> list:
    """The only non-tensor classes DeepSpeed pickles into its checkpoint files (training resumes
    with the real classes; the converter uses inert stand-ins, see convert/safe_load.py)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


@contextlib.contextmanager
def _patched(obj: Any, name: str, value: Any):
    own = name in vars(obj)
    previous = vars(obj).get(name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        if own:
            setattr(obj, name, previous)
        else:
            delattr(obj, name)
