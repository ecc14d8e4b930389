"""Fine-tuning examples from local JSON-lines files: reading, the train/valid split, validation.

Every example carries where it came from (file index, line number), so errors and the trainer's
non-finite-loss report name `file:line`. With `finetune.valid_fraction` a line goes to validation
when a hash of its bytes falls under the fraction (the sharder's rule), so the split does not
depend on the order of lines or on the number of ranks.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ds_train.config.schema import FinetuneSection
from ds_train.data.shard_set import DataError
from ds_train.data.sharding import is_valid_doc
from ds_train.finetune.chat import ChatFormat, ExampleError, to_messages


@dataclass(frozen=True)
class Example:
    record: dict
    file: int  # index into the split's file list
    line: int  # 1-based


def file_list(value) -> list[str]:
    """`finetune.train_file` / `valid_file` as absolute paths."""
    if value in (None, "", []):
        return []
    items = value if isinstance(value, list) else [value]
    return [str(Path(v).expanduser().absolute()) for v in items]


@dataclass(frozen=True)
class SplitSpec:
    """Where one split's examples come from."""

    files: list[str]
    valid_fraction: float = 0.0  # > 0: lines are split by hash between train and valid
    take_valid: bool = False  # with valid_fraction: this split keeps the held-out lines

    def examples(self) -> Iterator[Example]:
        for f, path in enumerate(self.files):
            for line_no, line in _lines(path):
                if self.valid_fraction and is_valid_doc(line, self.valid_fraction) != self.take_valid:
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{line_no}: not valid JSON ({e.msg})") from None
                if not isinstance(record, dict):
                    raise DataError(f"{path}:{line_no}: expected a JSON object, got {type(record).__name__}")
                yield Example(record, f, line_no)

    def where(self, example: Example) -> str:
        return f"{self.files[example.file]}:{example.line}"

    def sha256(self) -> str:
        h = hashlib.sha256()
        for path in self.files:
            with open(path, "rb") as fh:
                while block := fh.read(1 << 22):
                    h.update(block)
        h.update(f"|{self.valid_fraction}|{self.take_valid}".encode())
        return h.hexdigest()


def split_specs(section: FinetuneSection) -> dict[str, SplitSpec]:
    """{"train": spec, "valid": spec} (valid only when configured)."""
    train = file_list(section.train_file)
    valid = file_list(section.valid_file)
    if valid:
        return {"train": SplitSpec(train), "valid": SplitSpec(valid)}
    if section.valid_fraction > 0:
        return {
            "train": SplitSpec(train, section.valid_fraction, take_valid=False),
            "valid": SplitSpec(train, section.valid_fraction, take_valid=True),
        }
    return {"train": SplitSpec(train)}


def check_examples(
    section: FinetuneSection, specs: dict[str, SplitSpec], chat: ChatFormat | None = None
) -> list[str]:
    """Validate every example of every split (one line naming file:line on the first problem); SFT
    examples are also rendered with `chat`, so a template that cannot be used fails here.

    Returns the class names for classification (config order, or sorted distinct train labels)."""
    seen: dict[str, set] = {}
    for split, spec in specs.items():
        values: set = set()
        count = 0
        for ex in spec.examples():
            try:
                check_record(section, ex.record, chat)
            except ExampleError as e:
                raise DataError(f"{spec.where(ex)}: {e}") from None
            if section.task == "classification":
                values.add(ex.record[section.label_field])
            count += 1
        if count == 0:
            raise DataError(f"the {split} split is empty ({', '.join(spec.files)})")
        seen[split] = values
    if section.task != "classification":
        return []
    names = class_names(section, seen["train"])
    for split, values in seen.items():
        for value in sorted(values, key=lambda v: (isinstance(v, str), v)):  # the same error every run
            try:
                label_id(value, names)
            except ExampleError as e:
                raise DataError(f"{split} split ({', '.join(specs[split].files)}): {e}") from None
    if len(names) < 2:
        raise DataError(f"classification needs at least 2 classes, the train split has {names}")
    return names


def check_record(section: FinetuneSection, record: dict, chat: ChatFormat | None = None) -> None:
    if section.task == "sft":
        messages = to_messages(
            record,
            prompt=section.prompt_field,
            response=section.response_field,
            system=section.system_field,
            messages=section.messages_field,
        )
        if chat is not None:
            chat.render(messages)
        return
    text = record.get(section.text_field)
    if not isinstance(text, str):
        raise ExampleError(
            f"field '{section.text_field}' must be a string, got {_shown(record, section.text_field)}"
        )
    if section.task == "classification" and section.text_pair_field:
        pair = record.get(section.text_pair_field)
        if not isinstance(pair, str):
            raise ExampleError(
                f"field '{section.text_pair_field}' (finetune.text_pair_field) must be a string, "
                f"got {_shown(record, section.text_pair_field)}"
            )
    if section.task == "classification":
        label = record.get(section.label_field)
        if isinstance(label, bool) or not isinstance(label, (str, int)):
            raise ExampleError(
                f"field '{section.label_field}' must be a string or an integer class id, "
                f"got {_shown(record, section.label_field)}"
            )


def class_names(section: FinetuneSection, train_values: set) -> list[str]:
    if section.labels:
        return [str(v) for v in section.labels]
    kinds = {type(v) for v in train_values}
    if len(kinds) > 1:
        raise DataError(
            f"field '{section.label_field}' mixes strings and integers in the train split; "
            "use one kind, or list the classes in finetune.labels"
        )
    return [str(v) for v in sorted(train_values)]


def label_id(value: str | int, names: list[str]) -> int:
    """Class id of a label: a name from `names`, or an integer id below len(names).

    An integer is read as an id only when the class names are not integers themselves: with
    classes "0", "1", "3" (integer labels, named by themselves) a label 2 is no class, not the
    third one."""
    if isinstance(value, int):
        if str(value) in names:  # integer labels named by themselves ("0", "1", ...)
            return names.index(str(value))
        if all(n.lstrip("-").isdigit() for n in names):
            raise ExampleError(f"label {value} is not one of the classes {names[:10]}")
        if 0 <= value < len(names):
            return value
        raise ExampleError(f"label {value} is not a class id (0..{len(names) - 1})")
    if value not in names:
        raise ExampleError(f"label {value!r} is not one of the classes {names[:10]}")
    return names.index(value)


def _shown(record: dict, key: str) -> str:
    return "nothing (missing)" if key not in record else repr(record[key])[:60]


def _lines(path: str) -> Iterator[tuple[int, str]]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, 1):
            if line.strip():
                yield line_no, line.rstrip("\n")
