"""The tokenized fine-tuning data of a run: `<output_dir>/dataset/<split>/`, memory-mapped.

    dataset/train/meta.json     fingerprint, task, source files, class names, statistics
    dataset/train/tokens.npy    [rows, width] token ids (uint16/uint32), plus per task:
                                targets.npy + positions.npy (sft), lengths.npy + labels.npy
                                (classification); origin.npy (first example of each row) and
                                where.npy ([examples, 2]: file index, line) for error messages

Rank 0 tokenizes once (`prepare_splits`); every rank then maps the arrays read-only, and each
DataLoader worker copies out just the rows of its micro-batch. The fingerprint covers the source
files' bytes, the tokenizer, the chat template and every option that changes the arrays, so a
resumed run reuses the data exactly and a changed input is rebuilt (and refused on resume by the
checkpoint's data fingerprint). Numpy files rather than Arrow/`datasets`: the rows are fixed-width
integer arrays that `np.load(mmap_mode="r")` maps with no copy and no dependency in the workers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ds_train.config.schema import FinetuneSection
from ds_train.data.shard_set import DataError
from ds_train.distributed.engine import broadcast_object
from ds_train.finetune.chat import ChatFormat
from ds_train.finetune.encode import encode_split
from ds_train.finetune.records import SplitSpec

log = logging.getLogger(__name__)

DATASET_DIR = "dataset"
META = "meta.json"
FORMAT = "ds_train.finetune-dataset/1"
PER_EXAMPLE = ("where",)  # arrays indexed by example, not by row


@dataclass
class ExampleSet:
    """One tokenized split, opened lazily (after DataLoader workers fork)."""

    directory: Path
    meta: dict
    _arrays: dict[str, np.ndarray] | None = field(default=None, repr=False)

    @classmethod
    def open(cls, directory: str | os.PathLike) -> ExampleSet:
        directory = Path(directory)
        return cls(directory, json.loads((directory / META).read_text()))

    @property
    def num_rows(self) -> int:
        return int(self.meta["rows"])

    @property
    def fingerprint(self) -> str:
        return self.meta["fingerprint"]

    def arrays(self) -> dict[str, np.ndarray]:
        if self._arrays is None:
            self._arrays = {
                name: np.load(self.directory / f"{name}.npy", mmap_mode="r") for name in self.meta["arrays"]
            }
        return self._arrays

    def read(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """Copies of the per-row arrays at `rows`."""
        return {k: np.asarray(v[rows]) for k, v in self.arrays().items() if k not in PER_EXAMPLE}

    def describe(self, row: int) -> str:
        """`file:line` of the first example in a row (what the non-finite-loss report names)."""
        arrays = self.arrays()
        first = int(arrays["origin"][row])
        if first >= len(arrays["where"]):
            return f"{self.directory.name} row {row}"
        f, line = (int(x) for x in arrays["where"][first])
        return f"{self.meta['files'][f]}:{line} ({self.directory.name} row {row})"

    def __getstate__(self) -> dict:  # DataLoader workers re-map the files instead of pickling arrays
        return {"directory": self.directory, "meta": self.meta, "_arrays": None}


def data_fingerprint(
    section: FinetuneSection,
    specs: dict[str, SplitSpec],
    *,
    tokenizer_sha256: str,
    chat: ChatFormat | None,
    class_names: list[str],
    document_start: int | None = None,
) -> str:
    """What the arrays are a function of (reads every source file once). `document_start`: the
    token each masked-LM document starts with (RoBERTa's <s>; data/document_framing.py)."""
    options = {
        "format": FORMAT,
        "task": section.task,
        "seq_len": section.seq_len,
        "packing": section.packing,
        "train_on_inputs": section.train_on_inputs,
        "fields": [
            section.prompt_field,
            section.response_field,
            section.system_field,
            section.messages_field,
            section.text_field,
            section.label_field,
        ],
        "class_names": class_names,
        "tokenizer": tokenizer_sha256,
        # (only when set: an unpaired run's fingerprint, and so its resume, stays as it was)
        **({"text_pair_field": section.text_pair_field} if section.text_pair_field else {}),
        # (likewise: added in 2026-12, so only runs whose documents now start with it re-tokenize)
        **(
            {"document_start": document_start}
            if section.task == "masked_lm" and document_start is not None
            else {}
        ),
        "template": None if chat is None else [chat.name, getattr(chat.tokenizer, "chat_template", None)],
        "splits": {name: spec.sha256() for name, spec in specs.items()},
    }
    return hashlib.sha256(json.dumps(options, sort_keys=True).encode()).hexdigest()


def prepare_splits(
    run_dir: str | os.PathLike,
    section: FinetuneSection,
    specs: dict[str, SplitSpec],
    tokenizer,
    *,
    chat: ChatFormat | None,
    class_names: list[str],
    fingerprint: str,
    is_main: bool,
) -> dict[str, ExampleSet]:
    """Tokenize the splits on rank 0 (unless the run dir already holds them with this fingerprint);
    every rank returns the opened sets. Errors on rank 0 are raised on every rank."""
    root = Path(run_dir) / DATASET_DIR
    result: tuple[str, str] = ("ok", "")
    if is_main:
        try:
            for split, spec in specs.items():
                _build_if_stale(root / split, split, section, spec, tokenizer, chat, class_names, fingerprint)
        except DataError as e:
            result = ("error", str(e))
        except Exception as e:  # the other ranks must hear of it rather than wait for a timeout
            broadcast_object(("error", f"tokenizing the data failed: {e}"))
            raise
    status, message = broadcast_object(result)
    if status == "error":
        raise DataError(message)
    return {split: ExampleSet.open(root / split) for split in specs}


def _build_if_stale(directory, split, section, spec, tokenizer, chat, class_names, fingerprint) -> None:
    if _built_meta(directory, fingerprint) is not None:
        log.info("%s split: reusing the tokenized data in %s", split, directory)
        return
    arrays, stats = encode_checked(split, section, spec, tokenizer, chat, class_names)
    partial = directory.with_name(f".{directory.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    for name, array in arrays.items():
        np.save(partial / f"{name}.npy", array)
    meta = {
        "format": FORMAT,
        "fingerprint": fingerprint,
        "task": section.task,
        "split": split,
        "files": spec.files,
        "rows": stats["rows"],
        "width": int(arrays["tokens"].shape[1]),
        "class_names": class_names,
        "chat_template": None if chat is None else chat.name,
        "stats": stats,
        "arrays": sorted(arrays),
    }
    (partial / META).write_text(json.dumps(meta, indent=1))
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(partial, directory)
    log.info("%s split: %s → %s", split, _summary(stats), directory)


def encode_checked(split, section, spec, tokenizer, chat, class_names) -> tuple[dict[str, np.ndarray], dict]:
    """(arrays, stats) of one split; a DataError when tokenizing leaves no usable example (every one
    truncated to no target, for instance). What the start builds, and what `--check` runs."""
    arrays, stats = encode_split(section, spec.examples(), tokenizer, class_names=class_names, chat=chat)
    if stats["rows"] == 0:
        raise DataError(
            f"the {split} split has no usable example after tokenizing ({', '.join(spec.files)}; {_summary(stats)})"
        )
    return arrays, stats


def split_stats(run_dir, split, section, spec, tokenizer, chat, class_names, fingerprint) -> dict:
    """A split's statistics without writing anything: those of the run directory's tokenized data
    when it was built from the same inputs, else tokenized here (in memory) and dropped."""
    meta = _built_meta(Path(run_dir) / DATASET_DIR / split, fingerprint)
    if meta is not None:
        return meta["stats"]
    return encode_checked(split, section, spec, tokenizer, chat, class_names)[1]


def _built_meta(directory: Path, fingerprint: str) -> dict | None:
    """The meta.json of a split tokenized from the same inputs (`fingerprint`), else None."""
    meta_path = directory / META
    if not meta_path.is_file():
        return None
    meta = json.loads(meta_path.read_text())
    return meta if meta.get("fingerprint") == fingerprint else None


def _summary(stats: dict) -> str:
    return ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in stats.items())
