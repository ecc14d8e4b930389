"""`ds-train shard INPUT… --output DIR --tokenizer DIR --seq-len N` — corpus → webdataset shards.

Local: `--workers K` tokenizes and writes with K processes. Slurm array: every task runs the same
command with `--task-index i --num-tasks n` (tokenize only), then one `ds-train shard --merge
--output DIR` writes the shards and manifests (see sharding/). The output is the same either way.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from ds_train.data.document_framing import BOS_CHOICES


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
        "inputs",
        nargs="*",
        help="corpus files, directories or globs (.jsonl/.txt/.json/.parquet/.csv/.arrow, optionally "
        ".gz/.zst/.bz2/.xz; a save_to_disk directory; http(s)/s3 URLs)",
    )
    p.add_argument("--output", required=True, help="output directory (gets train/ and valid/ shard sets)")
    p.add_argument("--tokenizer", help="local tokenizer directory")
    p.add_argument("--seq-len", type=int, help="tokens per training sequence (rows hold seq_len + 1)")
    p.add_argument("--workers", type=int, default=1, help="worker processes (tokenizing and writing)")
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
    p.add_argument(
        "--member-size",
        type=parse_size,
        default=1 << 20,
        help="target bytes per tar member (a block of rows; default 1MB)",
    )
    p.add_argument(
        "--piece-size",
        type=parse_size,
        default=None,
        help="bytes of input per unit of parallel work (default: 1/256 of the input within 1-16MB; "
        "does not change the output)",
    )
    p.add_argument(
        "--bos",
        choices=BOS_CHOICES,
        default="auto",
        help="start each document with the tokenizer's BOS token: auto (default) when the tokenizer adds "
        "one to every text it encodes (Llama, Mistral, Gemma), so training sees what inference feeds "
        "the model; always; never",
    )
    p.add_argument(
        "--sft",
        action="store_true",
        help="SFT examples (.jsonl with prompt/response or messages): rendered and masked as "
        "`ds-train finetune` does, written with a <key>.mask.npy loss mask (one process)",
    )
    p.add_argument(
        "--chat-template",
        choices=("auto", "tokenizer", "plain"),
        default="auto",
        help="--sft: as finetune.chat_template (auto: the tokenizer's template when it has one)",
    )
    p.add_argument(
        "--train-on-inputs",
        action="store_true",
        help="--sft: as finetune.train_on_inputs (loss on prompts too)",
    )
    p.add_argument("--task-index", type=int, default=None, help="Slurm array mode: this task's index")
    p.add_argument("--num-tasks", type=int, default=None, help="Slurm array mode: number of tasks")
    p.add_argument("--merge", action="store_true", help="write shards + manifests from finished tasks")
    p.add_argument("--keep-work", action="store_true", help="keep the tokenized pieces after the merge")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=main, planned_defaults={name: p.get_default(name) for name in PLANNED})


# Options the tokenizing run (or array tasks) fixes in the plan; a --merge writes what was planned.
PLANNED = (
    "tokenizer",
    "seq_len",
    "valid_fraction",
    "text_field",
    "shard_size",
    "rows_per_shard",
    "member_size",
    "piece_size",
    "bos",
    "chat_template",
    "train_on_inputs",
    "task_index",
    "num_tasks",
)


def main(args: argparse.Namespace) -> int:
    from ds_train.config.loader import ConfigError
    from ds_train.data.corpus_pieces import CorpusError
    from ds_train.data.sharding import merge_shards

    _check_counts(args)
    if Path(args.output).exists() and not Path(args.output).is_dir():
        raise ConfigError(f"--output {args.output}: exists and is not a directory")
    # a one-process run that made --output and then met bad input takes it away again (array tasks
    # share the directory, and --merge reads what they left: theirs stays)
    made_here = not args.merge and args.task_index is None and not Path(args.output).exists()
    try:
        if args.merge:
            if args.sft:
                raise ConfigError("--sft runs in one process: there is no --merge step")
            if args.inputs:
                raise ConfigError("--merge takes no inputs: it reads the plan the tasks left in --output")
            _refuse_planned_options(args)
            manifests = merge_shards(
                args.output, workers=args.workers, progress=not args.no_progress, keep_work=args.keep_work
            )
        else:
            manifests = _tokenize(args)
            if manifests is None:
                return 0
    except (CorpusError, ConfigError) as e:
        if made_here:
            shutil.rmtree(args.output, ignore_errors=True)
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(str(e)) from None
    for split, m in manifests.items():
        print(
            f"{split}: {len(m['shards'])} shards, {m['total_rows']:,} rows, {m['total_tokens']:,} tokens, "
            f"{m['total_documents']:,} documents -> {args.output}/{split}"
        )
    valid = manifests.get("valid")
    if valid is not None and valid["total_rows"] == 0:
        # written (the train set is fine), but training refuses an empty data.valid: say so now
        sys.stderr.write(
            f"ds-train: warning: the valid split is empty ({valid['total_documents']} documents held "
            "out): use a larger --valid-fraction, or leave data.valid out of the run's config\n"
        )
    return 0


def _refuse_planned_options(args: argparse.Namespace) -> None:
    """--merge used to ignore --rows-per-shard, --tokenizer, … silently: the layout was fixed when
    the tasks planned it, so a value given here would not be the one written."""
    from ds_train.config.loader import ConfigError
    from ds_train.data.sharding import PLAN, work_dir

    given = [n for n, default in args.planned_defaults.items() if getattr(args, n) != default]
    if given:
        options = ", ".join("--" + n.replace("_", "-") for n in given)
        raise ConfigError(
            f"--merge writes the layout the tokenizing tasks planned (tokenizer, seq_len, shard sizes: "
            f"{work_dir(args.output) / PLAN}) and takes no {options}: give them to the tasks' command"
        )


def _check_counts(args: argparse.Namespace) -> None:
    """Refuse counts and sizes below 1: argparse takes any int, and e.g. --rows-per-shard -5 wrote
    an empty shard set while 0 silently meant "not set"."""
    from ds_train.config.loader import ConfigError

    for option, value in (
        ("--workers", args.workers),
        ("--rows-per-shard", args.rows_per_shard),
        ("--shard-size", args.shard_size),
        ("--member-size", args.member_size),
        ("--piece-size", args.piece_size),
        ("--num-tasks", args.num_tasks),
    ):
        if value is not None and value < 1:
            raise ConfigError(f"{option} must be ≥ 1, got {value}")


def _tokenize(args: argparse.Namespace) -> dict | None:
    """Both phases, or (array mode) this task's share of phase 1; None when the merge is left to do."""
    from pathlib import Path

    from transformers import AutoTokenizer

    from ds_train.config.loader import ConfigError
    from ds_train.data.sharding import ShardOptions, prepare_plan, shard_corpus, tokenize_task

    if not args.inputs:
        raise ConfigError("no inputs: give corpus files (or --merge after an array job)")
    if args.tokenizer is None or args.seq_len is None:
        raise ConfigError("--tokenizer and --seq-len are required")
    if args.seq_len < 2:
        raise ConfigError("--seq-len must be ≥ 2")
    if not 0 <= args.valid_fraction < 1:
        raise ConfigError("--valid-fraction must be within [0, 1)")
    if (args.task_index is None) != (args.num_tasks is None):
        raise ConfigError("--task-index and --num-tasks go together")
    if not Path(args.tokenizer).is_dir():
        raise ConfigError(f"--tokenizer: directory not found: {args.tokenizer}")
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer, local_files_only=True)
    opts = ShardOptions(
        seq_len=args.seq_len,
        valid_fraction=args.valid_fraction,
        text_field=args.text_field,
        shard_bytes=args.shard_size,
        rows_per_shard=args.rows_per_shard,
        member_bytes=args.member_size,
        progress=not args.no_progress,
        workers=args.workers,
        keep_work=args.keep_work,
        bos=args.bos,
    )
    if args.piece_size is not None:
        opts.piece_bytes = args.piece_size
    if args.sft:
        from ds_train.data.sft_sharding import shard_sft

        if args.task_index is not None:
            raise ConfigError("--sft runs in one process: no --task-index/--num-tasks")
        if args.bos != "auto":
            raise ConfigError(
                "--bos applies to pretraining corpora: --sft examples start as the chat template has them"
            )
        return shard_sft(
            args.inputs,
            args.output,
            tokenizer,
            opts,
            chat_template=args.chat_template,
            train_on_inputs=args.train_on_inputs,
        )
    if args.task_index is None:
        return shard_corpus(args.inputs, args.output, tokenizer, opts)
    plan = prepare_plan(args.inputs, args.output, tokenizer, opts)
    done = tokenize_task(
        plan,
        args.output,
        tokenizer,
        workers=args.workers,
        task_index=args.task_index,
        num_tasks=args.num_tasks,
        progress=opts.progress,
    )
    print(
        f"task {args.task_index}/{args.num_tasks}: tokenized {done['pieces']} pieces "
        f"({done['documents']:,} documents, {done['tokens']:,} tokens); when every task is done run "
        f"`ds-train shard --merge --output {args.output}`"
    )
    return None
