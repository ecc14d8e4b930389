"""`ds-train convert to-hf`: a ZeRO 0-3 checkpoint → a complete Hugging Face directory.

Streaming: the output is planned from metadata (zero_layout.py), checked against the model class
(every key the class expects is present, nothing unexpected, so `from_pretrained` loads it without
warnings or re-initialised weights), then each tensor is copied from the memory-mapped rank files
into sharded safetensors (safetensors_stream.py). Weights come from the fp32 master copy; frozen
parameters and persistent buffers keep their own dtypes; tied weights are written once and
re-tied by transformers on load. The directory appears atomically: it is written under a
temporary name and renamed when complete.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from ds_train.checkpoint.layout import HF_CONFIG_DIR, TOKENIZER_DIR, recorded_state, resolve_checkpoint
from ds_train.convert.hf_dir import copy_tokenizer, load_config, model_class, write_configs
from ds_train.convert.safetensors_stream import OutputTensor, PieceReader, write_sharded
from ds_train.convert.zero_layout import CheckpointError, ZeroCheckpoint, read_zero_checkpoint

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_SHARD_BYTES = 2 << 30


def resolve_tag_dir(path: str | os.PathLike, tag: str | None = None) -> Path:
    """The directory holding the rank files: from a run dir, a checkpoints/ dir or a tag dir."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if tag is None and any(p.glob("*model_states.pt")):
        return p
    try:
        ref = resolve_checkpoint(p, tag)
    except FileNotFoundError:
        raise CheckpointError(f"no checkpoint under {path} (no `latest` file, no step_* directory)") from None
    if not ref.path.is_dir():
        raise CheckpointError(f"checkpoint tag {ref.tag!r} not found under {ref.root}")
    return ref.path


def plan_output(ckpt: ZeroCheckpoint, dtype: torch.dtype) -> list[OutputTensor]:
    """The tensors to write, in checkpoint order: a weight tied to another (DeepSpeed's
    shared_params, or the same bytes under a second name) is written once."""
    out: list[OutputTensor] = []
    names: set[str] = set()
    seen_storage: set[tuple] = set()
    for t in ckpt.tensors:
        if t.name in ckpt.tied or t.name in names:
            continue
        key = (t.pieces[0].file, t.pieces[0].offset) if t.pieces else (t.name,)
        if key in seen_storage:
            continue
        seen_storage.add(key)
        names.add(t.name)
        out_dtype = dtype if t.kind == "trainable" and t.dtype.is_floating_point else t.dtype
        out.append(OutputTensor(t, out_dtype))
    return out


def check_against_model(ckpt: ZeroCheckpoint, names: list[str], cls, config) -> None:
    """Every key the model class needs is written and nothing else, so `from_pretrained` loads the
    directory without warnings or re-initialised weights."""
    with torch.device("meta"):
        model = cls(config)
    expected = list(model.state_dict().keys())
    written = set(names)
    if any(".lora_A." in n or n.startswith("base_model.model.") for n in written):
        raise CheckpointError(
            f"{ckpt.path} is a LoRA fine-tuning checkpoint (adapters on a frozen base): its run "
            "directory's hf/ holds the merged model and adapter/ the adapters; "
            "`ds-train convert merge-lora RUN/adapter OUT` merges them again"
        )
    droppable = set(_tied_names(model)) | set(ckpt.tied)
    missing = [
        k for k in expected if k not in written and k not in droppable and not _is_nonpersistent(model, k)
    ]
    unexpected = sorted(written - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(
                f"{len(missing)} tensors the model needs are not in the checkpoint (e.g. {missing[0]})"
            )
        if unexpected:
            parts.append(
                f"{len(unexpected)} checkpoint tensors the model does not have (e.g. {unexpected[0]})"
            )
        raise CheckpointError(f"{ckpt.path} does not match {cls.__name__}: " + "; ".join(parts))


def _model_class_checked(config_src: Path, objective: str | None, ckpt: ZeroCheckpoint, names: list[str]):
    config = load_config(config_src)
    cls = model_class(config, objective)
    check_against_model(ckpt, names, cls, config)
    return config, cls


def _tied_names(model: torch.nn.Module) -> list[str]:
    """Names of parameters that share storage with an earlier one (what save_pretrained drops)."""
    seen: dict[int, str] = {}
    tied = []
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            tied.append(name)
        else:
            seen[id(p)] = name
    return tied


def _is_nonpersistent(model: torch.nn.Module, key: str) -> bool:
    module_name, _, attr = key.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    return attr in getattr(module, "_non_persistent_buffers_set", set())


def convert_checkpoint(
    ckpt: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    tag: str | None = None,
    dtype: str = "fp32",
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    model_config: str | os.PathLike | None = None,
    tokenizer: str | os.PathLike | None = None,
    verify: bool = False,
) -> Path:
    """Write the HF directory for a checkpoint; replaces `out_dir` atomically. Returns it."""
    t0 = time.time()
    if dtype not in DTYPES:
        raise CheckpointError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    tag_dir = resolve_tag_dir(ckpt, tag)
    recorded = recorded_state(tag_dir)
    objective = recorded.get("objective")
    config_src = Path(model_config) if model_config else tag_dir / HF_CONFIG_DIR
    if not (config_src.is_file() or (config_src / "config.json").is_file()):
        raise CheckpointError(
            f"{tag_dir} has no {HF_CONFIG_DIR}/config.json: pass --model-config with the HF config "
            "the checkpoint was trained with"
        )
    zero = read_zero_checkpoint(tag_dir, recorded)
    tensors = plan_output(zero, DTYPES[dtype])

    out = Path(out_dir).absolute()
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    reader = PieceReader()
    # The model class (transformers' imports are the slowest part of a small conversion) is
    # loaded and checked against the plan in a thread while the tensors stream out; nothing is
    # renamed into place before the check has passed.
    with ThreadPoolExecutor(1) as pool:
        check = pool.submit(_model_class_checked, config_src, objective, zero, [t.plan.name for t in tensors])

        def stop_if_check_failed() -> None:
            if check.done() and check.exception() is not None:
                raise check.exception()

        try:
            write_sharded(tmp, tensors, max_shard_bytes, reader, before_tensor=stop_if_check_failed)
            config, cls = check.result()
            write_configs(tmp, config, cls, DTYPES[dtype])
            copy_tokenizer(Path(tokenizer) if tokenizer else tag_dir / TOKENIZER_DIR, tmp)
        except BaseException:
            check.cancel()
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            reader.close()
    _replace_dir(tmp, out)
    log.info(
        "wrote %s (%d tensors, %s) from ZeRO-%d checkpoint %s in %.1fs",
        out,
        len(tensors),
        dtype,
        zero.stage,
        tag_dir,
        time.time() - t0,
    )
    if verify:
        from ds_train.convert.verify import verify_conversion

        report = verify_conversion(tag_dir, out, model_config=model_config)
        if not report.ok:
            raise CheckpointError(f"verification of {out} failed: {report.summary_line()}")
    return out


def _replace_dir(tmp: Path, out: Path) -> None:
    """Rename the finished directory into place; an existing one is moved aside first."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
