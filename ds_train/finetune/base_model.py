"""Where the model to fine-tune comes from: an HF directory, or a `ds-train pretrain` run.

`model.init_from` may name
- a Hugging Face model directory (config.json + *.safetensors / *.bin), used as is;
- a ds_train run directory, its `checkpoints/` folder or one `step_XXXXXXXX` checkpoint: the
  checkpoint's consolidated fp32 weights are exported by the conversion code (`ds-train convert
  to-hf`) into `<output_dir>/base_model/` on rank 0 the first time, then loaded like any HF
  directory. The checkpoint's `hf_config/` and `tokenizer/` answer every preflight question
  without touching the weights, so nothing is written before the process group starts.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from ds_train.checkpoint.layout import (
    HF_CONFIG_DIR,
    STATE_FILE,
    TOKENIZER_DIR,
    CheckpointRef,
    resolve_checkpoint,
)
from ds_train.config.loader import ConfigError
from ds_train.distributed.engine import broadcast_object

log = logging.getLogger(__name__)

BASE_MODEL_DIR = "base_model"
SOURCE_FILE = "ds_train_source.json"  # which checkpoint a converted base_model/ came from
WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")


@dataclass(frozen=True)
class InitSource:
    given: str  # model.init_from as configured
    config_dir: str  # holds config.json
    tokenizer_dir: str  # the default tokenizer
    hf_dir: str | None = None  # an HF model directory to load directly
    checkpoint: CheckpointRef | None = None  # a ds_train checkpoint to convert first

    def describe(self) -> str:
        if self.checkpoint is None:
            return self.given
        return f"{self.given} (ds_train checkpoint {self.checkpoint.tag})"


def resolve_init_source(path: str) -> InitSource:
    """Classify `model.init_from`; ConfigError (one line) when it is neither kind."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"model.init_from: not found: {path}")
    if (p / "config.json").is_file():
        if not any(next(p.glob(pattern), None) for pattern in WEIGHT_PATTERNS):
            raise ConfigError(f"model.init_from: {path} has a config.json but no weights (*.safetensors)")
        return InitSource(given=path, config_dir=path, tokenizer_dir=path, hf_dir=path)
    try:
        ref = resolve_checkpoint(p)
    except FileNotFoundError:
        raise ConfigError(
            f"model.init_from: {path} is neither a Hugging Face model directory (config.json + weights) "
            "nor a ds_train run or checkpoint directory"
        ) from None
    if not (ref.path / STATE_FILE).is_file() or not (ref.path / HF_CONFIG_DIR / "config.json").is_file():
        raise ConfigError(
            f"model.init_from: {ref.path} is not a complete ds_train checkpoint (no {STATE_FILE} or "
            f"{HF_CONFIG_DIR}/config.json)"
        )
    return InitSource(
        given=path,
        config_dir=str(ref.path / HF_CONFIG_DIR),
        tokenizer_dir=str(ref.path / TOKENIZER_DIR),
        checkpoint=ref,
    )


def materialize_base(source: InitSource | None, run_dir: str | os.PathLike, *, is_main: bool) -> str | None:
    """The HF directory to load weights from (None: build fresh from model.config).

    A checkpoint is converted once by rank 0 into `<run_dir>/base_model/` (reused while it still
    names the same checkpoint); the other ranks wait for it."""
    if source is None:
        return None
    if source.checkpoint is None:
        return source.hf_dir
    out = Path(run_dir) / BASE_MODEL_DIR
    result = ("ok", "")
    if is_main:
        try:
            _convert_if_stale(source.checkpoint, out)
        except Exception as e:  # the other ranks must hear about it, not time out
            result = ("error", f"model.init_from: converting {source.checkpoint.path} failed: {e}")
    status, message = broadcast_object(result)
    if status == "error":  # one line on every rank, as a bad config is
        raise ConfigError(message)
    return str(out)


def _convert_if_stale(ref: CheckpointRef, out: Path) -> None:
    state = ref.state()
    identity = {"checkpoint": str(ref.path.resolve()), "step": ref.step, "saved_at": state.get("saved_at")}
    marker = out / SOURCE_FILE
    if marker.is_file() and json.loads(marker.read_text()) == identity:
        log.info("base model: reusing %s (converted from %s)", out, ref.path)
        return
    # `ds-train convert to-hf`, the same code path users run by hand
    from ds_train.convert.to_hf import convert_checkpoint

    log.info("base model: converting %s to a Hugging Face directory %s", ref.path, out)
    convert_checkpoint(ref.path, out)
    marker.write_text(json.dumps(identity))
