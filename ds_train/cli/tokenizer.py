"""`ds-train tokenizer train INPUT… --output DIR [--vocab-size N]` — a byte-level BPE tokenizer."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer on local text")
    tsub = p.add_subparsers(dest="action", required=True)
    t = tsub.add_parser("train", help="train and save as an HF tokenizer directory")
    t.add_argument("inputs", nargs="+", help="corpus files (same formats as `ds-train shard`)")
    t.add_argument("--output", required=True)
    t.add_argument("--vocab-size", type=int, default=4096)
    t.add_argument("--text-field", default="text")
    t.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from ds_train.config.loader import ConfigError
    from ds_train.data.corpus_pieces import CorpusError, expand_inputs
    from ds_train.data.corpus_reader import iter_documents
    from ds_train.data.tokenizer_training import train_bpe

    try:
        paths = expand_inputs(args.inputs)  # a missing input is named before minutes of training
        texts = (doc for path in paths for doc in iter_documents(path, args.text_field))
        out = train_bpe(texts, args.output, args.vocab_size)
    except CorpusError as e:  # bad input: one line (exit 2), not a traceback
        raise ConfigError(str(e)) from None
    print(f"tokenizer written to {out}")
    return 0
