"""Fine-tuning demo data built from the running Python's standard library, on any machine offline.

- classification: which standard-library package a docstring comes from (the docstring alone,
  without its qualified name, which would give the answer away), over the packages with the most
  docstrings, at most `per_class` examples each;
- SFT: "What does `json.dumps` do?" → the docstring's first sentence.

Both are deterministic for a given Python version; examples go to train or valid by a hash of
their text, so the split is stable too.
"""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from pathlib import Path

from ds_train.data.sharding import is_valid_doc
from ds_train.demo.corpus import iter_docstrings

FIRST_SENTENCE = re.compile(r"^(.+?[.!?])(\s|$)", re.S)


def write_classification_data(
    out_dir: str | Path, *, num_classes: int = 6, per_class: int = 160, valid_fraction: float = 0.15
) -> dict:
    """`train.jsonl` / `valid.jsonl` of {"text", "label"}; returns counts and the classes."""
    docs = list(iter_docstrings())
    counts = Counter(d["package"] for d in docs)
    classes = sorted(p for p, _ in counts.most_common(num_classes))
    taken: dict[str, int] = defaultdict(int)
    rows = []
    for d in docs:
        if d["package"] not in classes or taken[d["package"]] >= per_class:
            continue
        body = d["text"].split("\n\n", 1)[-1].strip()
        taken[d["package"]] += 1
        rows.append({"text": body, "label": d["package"]})
    return _write_split(Path(out_dir), rows, valid_fraction) | {"classes": classes}


def write_sft_data(out_dir: str | Path, *, max_examples: int = 1500, valid_fraction: float = 0.05) -> dict:
    """`train.jsonl` / `valid.jsonl` of {"prompt", "response"}: what a stdlib function or class does."""
    rows = []
    for d in iter_docstrings():
        name, _, body = d["text"].partition("\n\n")
        match = FIRST_SENTENCE.match(body.strip())
        if name == d["module"] or match is None:
            continue  # module docstrings and fragments without a sentence
        sentence = " ".join(match.group(1).split())
        if not 20 <= len(sentence) <= 200:
            continue
        rows.append({"prompt": f"What does `{name}` do?", "response": sentence})
        if len(rows) == max_examples:
            break
    return _write_split(Path(out_dir), rows, valid_fraction)


def _write_split(out_dir: Path, rows: list[dict], valid_fraction: float) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    counts = {"train": 0, "valid": 0}
    with open(out_dir / "train.jsonl", "w") as train, open(out_dir / "valid.jsonl", "w") as valid:
        for row in rows:
            line = json.dumps(row, ensure_ascii=False)
            split = "valid" if is_valid_doc(line, valid_fraction) else "train"
            (valid if split == "valid" else train).write(line + "\n")
            counts[split] += 1
    return counts
