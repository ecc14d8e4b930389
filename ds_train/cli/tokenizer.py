"""`ds-train tokenizer train INPUT… --output DIR [--vocab-size N]` — a byte-level BPE tokenizer."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer on local text")
    tsub = p.add_subparsers(dest="action", required=True)
    t = tsub.add_parser("train", help="train and save as an HF tokenizer directory")
    t.add_argument("inputs", nargs="+", help="corpus files (same formats as `ds-train shard`)")
    t.add_argument("--output", required=True)
    t.add_argument("--vocab-size", type=int, default=4096)
    t.add_argument("--text-field", default="text")
    t.set_defaults(func=main)


def main(args) -> int:
    from ds_train.data.corpus_reader import iter_documents
    from ds_train.data.tokenizer_training import train_bpe

    texts = (doc for path in args.inputs for doc in iter_documents(path, args.text_field))
    out = train_bpe(texts, args.output, args.vocab_size)
    print(f"tokenizer written to {out}")
    return 0
