"""`ds-train shard INPUT… --output DIR --tokenizer DIR --seq-len N` — corpus → webdataset shards."""

from __future__ import annotations

import argparse


def parse_size(text: str) -> int:
    units = {"KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "B": 1}
    t = text.strip().upper()
    for unit in sorted(units, key=len, reverse=True):
        if t.endswith(unit):
            return int(float(t[: -len(unit)]) * units[unit])
    return int(t)


def register(sub) -> None:
    p = sub.add_parser(
        "shard",
        help="tokenize and pack a corpus into webdataset shards",
        description="Tokenize and pack text corpora into webdataset tar shards with a manifest.",
    )
    p.add_argument(
        "inputs", nargs="+", help="corpus files (.jsonl/.txt/.json/.parquet/.csv, optionally .gz/.zst)"
    )
    p.add_argument("--output", required=True, help="output directory (gets train/ and valid/ shard sets)")
    p.add_argument("--tokenizer", required=True, help="local tokenizer directory")
    p.add_argument(
        "--seq-len", type=int, required=True, help="tokens per training sequence (rows hold seq_len + 1)"
    )
    p.add_argument("--workers", type=int, default=1, help="worker processes")
    p.add_argument(
        "--valid-fraction", type=float, default=0.0, help="fraction of documents held out for validation"
    )
    p.add_argument("--text-field", default="text", help="field holding the text in JSON/parquet records")
    p.add_argument(
        "--shard-size", type=parse_size, default=64 << 20, help="target bytes per shard (default 64MB)"
    )
    p.add_argument(
        "--rows-per-shard", type=int, default=None, help="exact rows per shard (overrides --shard-size)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from pathlib import Path

    from transformers import AutoTokenizer

    from ds_train.config.loader import ConfigError
    from ds_train.data.corpus_reader import CorpusError
    from ds_train.data.sharding import ShardOptions, document_separator, shard_corpus

    if args.seq_len < 2:
        raise ConfigError("--seq-len must be ≥ 2")
    if not 0 <= args.valid_fraction < 1:
        raise ConfigError("--valid-fraction must be within [0, 1)")
    if not Path(args.tokenizer).is_dir():
        raise ConfigError(f"--tokenizer: directory not found: {args.tokenizer}")
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer, local_files_only=True)
    if document_separator(tokenizer) is None:
        raise ConfigError(f"--tokenizer {args.tokenizer} has no EOS or SEP token to separate documents")
    opts = ShardOptions(
        seq_len=args.seq_len,
        valid_fraction=args.valid_fraction,
        text_field=args.text_field,
        shard_bytes=args.shard_size,
        rows_per_shard=args.rows_per_shard,
        progress=not args.no_progress,
    )
    try:
        manifests = shard_corpus(args.inputs, args.output, tokenizer, opts)
    except CorpusError as e:
        raise ConfigError(str(e)) from None
    for split, m in manifests.items():
        print(
            f"{split}: {len(m['shards'])} shards, {m['total_rows']:,} rows, {m['total_tokens']:,} tokens, "
            f"{m['total_documents']:,} documents -> {Path(args.output) / split}"
        )
    return 0
