"""`ds-train shard --sft`: SFT examples (JSON lines) → webdataset shards that keep the loss mask.

The examples are rendered, tokenized, masked and packed by fine-tuning's own code
(finetune/encode.py: chat template, response-only targets, whole examples first-fit into rows of
seq_len + 1), so a row of these shards is exactly the row `ds-train finetune` builds from the same
lines with `finetune.train_file`. Each block of rows goes into the tar as `<key>.tokens.npy`,
`<key>.mask.npy` (uint8, 1 = the token is a loss target) and `<key>.json` (the columns where
examples start: positions restart there); the manifest's `sft` entry records how the examples were
rendered, which `ds-train finetune` checks against its own settings.

One process: SFT sets are small next to pretraining corpora, and first-fit packing looks across
rows, so cutting the input into independent pieces (sharding.py's parallelism) would change the
rows with the number of workers. The train/valid split hashes each line like finetune.valid_fraction.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ds_train.data.corpus_pieces import CorpusError
from ds_train.data.shard_format import MANIFEST, tokenizer_fingerprint, write_manifest
from ds_train.data.shard_format import write_shard as write_shard_file
from ds_train.data.shard_set import DataError
from ds_train.data.sharding import ShardOptions

__all__ = ["example_boundaries", "shard_sft"]

SFT_INPUT_SUFFIXES = (".jsonl", ".jsonl.gz")


def shard_sft(
    inputs: list[str],
    output: str | os.PathLike,
    tokenizer,
    opts: ShardOptions,
    *,
    chat_template: str = "auto",
    train_on_inputs: bool = False,
) -> dict[str, dict]:
    """Shard the SFT examples of `inputs` (local JSON-lines files); returns {split: manifest}."""
    from ds_train.config.schema import FinetuneSection
    from ds_train.finetune.chat import ChatFormat
    from ds_train.finetune.encode import encode_split
    from ds_train.finetune.records import SplitSpec, check_examples, file_list

    output = Path(output)
    files = file_list(list(inputs))
    for path in files:
        if not Path(path).is_file() or not path.endswith(SFT_INPUT_SUFFIXES):
            raise CorpusError(f"--sft reads local JSON-lines files (.jsonl, .jsonl.gz): {path}")
    if not getattr(tokenizer, "is_fast", False):
        raise CorpusError("--sft needs a fast tokenizer (tokenizer.json) for token offsets")
    section = FinetuneSection(
        task="sft",
        seq_len=opts.seq_len,
        chat_template=chat_template,
        train_on_inputs=train_on_inputs,
        valid_fraction=opts.valid_fraction,
    )
    vf = opts.valid_fraction
    specs = {"train": SplitSpec(files, vf, take_valid=False)}
    if vf > 0:
        specs["valid"] = SplitSpec(files, vf, take_valid=True)
    for split in specs:
        if (output / split / MANIFEST).exists():
            raise CorpusError(
                f"{output / split} already holds a shard set; remove it or choose another --output"
            )
    chat = ChatFormat(tokenizer, chat_template)
    try:
        check_examples(section, specs, chat)  # one line naming file:line on the first bad example
    except DataError as e:
        raise CorpusError(str(e)) from None
    rendering = {
        "chat_template": chat.name,
        "template": chat.export_template(),
        "train_on_inputs": train_on_inputs,
        "fields": {
            "prompt": section.prompt_field,
            "response": section.response_field,
            "system": section.system_field,
            "messages": section.messages_field,
        },
    }
    manifests = {}
    for split, spec in specs.items():
        arrays, stats = encode_split(section, spec.examples(), tokenizer, class_names=[], chat=chat)
        if stats["rows"] == 0:
            raise CorpusError(f"the {split} split has no usable SFT example ({', '.join(files)}; {stats})")
        manifests[split] = _write_split(
            output / split, split, arrays, opts, tokenizer, rendering, stats, files
        )
    return manifests


def example_boundaries(positions: np.ndarray, examples: np.ndarray) -> tuple[list[list[int]], list[int]]:
    """(per row: the columns where examples start, every example's length) of packed SFT rows.

    finetune/packing.py restarts positions at 0 for each example and once more for the padding
    tail, so a row's first `examples[r]` zeros are its example starts."""
    starts, lengths = [], []
    width = positions.shape[1]
    for row, count in zip(positions, examples.tolist()):
        zeros = np.flatnonzero(row == 0)
        ends = np.append(zeros[1:], width)
        starts.append(zeros[:count].tolist())
        lengths.extend((ends - zeros)[:count].tolist())
    return starts, lengths


def _write_split(
    out_dir: Path, split, arrays, opts: ShardOptions, tokenizer, rendering, stats, files
) -> dict:
    tokens, masks = arrays["tokens"], arrays["targets"].astype(np.uint8)
    starts, lengths = example_boundaries(arrays["positions"], arrays["examples"])
    per_shard, per_member = opts.rows_per(tokens.shape[1] * tokens.itemsize)
    out_dir.mkdir(parents=True, exist_ok=True)
    shards = []
    first_example = np.concatenate([[0], np.cumsum(arrays["examples"])])
    for j, lo in enumerate(range(0, len(tokens), per_shard)):
        hi = min(lo + per_shard, len(tokens))
        shard_stats = write_shard_file(
            out_dir,
            f"{split}-{j:06d}.tar",
            tokens[lo:hi],
            starts[lo:hi],
            per_member,
            lengths[first_example[lo] : first_example[hi]],
            masks=masks[lo:hi],
        )
        shards.append(shard_stats)
    manifest = write_manifest(
        out_dir,
        split=split,
        seq_len=opts.seq_len,
        dtype=tokens.dtype,
        tokenizer=tokenizer_fingerprint(tokenizer),
        shards=shards,
        extra={
            "inputs": files,
            "valid_fraction": opts.valid_fraction,
            "sft": {**rendering, "stats": stats},
        },
    )
    return manifest
