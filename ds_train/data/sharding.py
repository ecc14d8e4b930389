"""`ds-train shard`: raw corpus files → tokenized, packed webdataset shards + manifests.

Two phases, so that the output is byte-identical whatever the parallelism:

1. tokenize — the inputs are cut into pieces (corpus_pieces.py; the cut depends on the inputs
   only). Each piece is tokenized on its own into token-stream files in a work directory
   (piece_tokenizer.py), by K local worker processes or by the tasks of a Slurm array (task i of
   n takes pieces i, i+n, i+2n, ...). A piece already done is skipped, so a re-run continues.
2. merge — all token counts are now known, so the split's stream (the pieces' streams in piece
   order) has known row boundaries: shard j holds rows [j·R, (j+1)·R) and is cut straight out of
   the memory-mapped piece files (packing.cut_rows), each shard by any of K workers. Then the
   manifest is written and the work directory removed.

Output: `<output>/train/` and (with valid_fraction > 0) `<output>/valid/`, each holding
`<split>-NNNNNN.tar` shards and `index.json`. A document goes to validation when a hash of its
text falls under the fraction, so the split does not depend on order or parallelism either.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ds_train.data.corpus_pieces import CorpusError, Piece, plan_pieces
from ds_train.data.document_framing import document_separator, document_start
from ds_train.data.packing import cut_rows, effective_pad, packed_row_count, row_doc_starts
from ds_train.data.piece_tokenizer import BatchEncoder, done_marker, is_valid_doc, tokenize_piece
from ds_train.data.remote import is_remote, with_retries
from ds_train.data.shard_format import (
    MANIFEST,
    ShardStats,
    token_dtype,
    tokenizer_fingerprint,
    write_manifest,
    write_shard,
)
from ds_train.data.shard_progress import Meter
from ds_train.data.token_stream import PieceCounts, SplitStream
from ds_train.data.worker_pool import run_tasks

__all__ = [
    "ShardOptions",
    "is_valid_doc",
    "merge_shards",
    "prepare_plan",
    "shard_corpus",
    "tokenize_task",
]

WORK_DIR = ".shard-work"
PLAN = "plan.json"
PLAN_FORMAT = "ds_train.shard-plan/1"


@dataclass
class ShardOptions:
    seq_len: int
    valid_fraction: float = 0.0
    text_field: str = "text"
    shard_bytes: int = 64 << 20
    rows_per_shard: int | None = None
    member_bytes: int = 1 << 20
    progress: bool = True
    workers: int = 1
    piece_bytes: int | None = None  # the unit of parallel work (None: automatic); never changes the output
    keep_work: bool = False
    bos: str = "auto"  # auto | always | never: see document_start

    def rows_per(self, row_bytes: int) -> tuple[int, int]:
        per_shard = self.rows_per_shard or max(1, self.shard_bytes // row_bytes)
        per_member = max(1, min(per_shard, self.member_bytes // row_bytes))
        return per_shard, per_member


def work_dir(output: str | os.PathLike) -> Path:
    return Path(output) / WORK_DIR


def shard_corpus(
    inputs: list[str], output: str | os.PathLike, tokenizer, opts: ShardOptions
) -> dict[str, dict]:
    """Both phases in this process and its `opts.workers` workers; returns {split: manifest}."""
    plan = prepare_plan(inputs, output, tokenizer, opts)
    tokenize_task(plan, output, tokenizer, workers=opts.workers, progress=opts.progress)
    return merge_shards(output, workers=opts.workers, progress=opts.progress, keep_work=opts.keep_work)


def prepare_plan(inputs: list[str], output: str | os.PathLike, tokenizer, opts: ShardOptions) -> dict:
    """The plan every task and the merge agree on, written to the work directory (or checked
    against the one there: all tasks of an array job compute the same plan)."""
    output = Path(output)
    splits = ["train", "valid"] if opts.valid_fraction > 0 else ["train"]
    for s in splits:
        if (output / s / MANIFEST).exists():
            raise CorpusError(f"{output / s} already holds a shard set; remove it or choose another --output")
    separator = document_separator(tokenizer)
    if separator is None:
        raise CorpusError("the tokenizer has no EOS or SEP token to separate documents")
    dtype = token_dtype(len(tokenizer))
    per_shard, per_member = opts.rows_per((opts.seq_len + 1) * dtype.itemsize)
    pieces = plan_pieces([str(p) for p in inputs], opts.piece_bytes)
    plan = {
        "format": PLAN_FORMAT,
        "inputs": [str(p) for p in inputs],
        "pieces": [p.to_json() for p in pieces],
        "input_stamps": input_stamps(pieces),
        "splits": splits,
        "seq_len": opts.seq_len,
        "valid_fraction": opts.valid_fraction,
        "text_field": opts.text_field,
        "dtype": dtype.name,
        "separator": int(separator),
        "pad_id": effective_pad(separator, tokenizer.pad_token_id),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "rows_per_shard": per_shard,
        "rows_per_member": per_member,
    }
    bos = document_start(tokenizer, opts.bos)
    if bos is not None:  # only then: the work of plans made before --bos existed stays resumable
        plan["bos"] = bos
    if not plan["pieces"]:
        raise CorpusError(f"the inputs hold no data: {', '.join(plan['inputs'])}")
    plan["id"] = hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()[:16]
    work = work_dir(output)
    work.mkdir(parents=True, exist_ok=True)
    path = work / PLAN
    if path.exists():
        old = json.loads(path.read_text())
        if old.get("id") != plan["id"]:
            changed = _changed_input(old, plan)
            if changed:
                raise CorpusError(
                    f"{changed} changed (size or modification time) since the sharding work in {work} "
                    "began: its finished pieces hold the old content; remove the work directory to start over"
                )
            if _without(old, "id") == _without(plan, "id", "bos"):
                raise CorpusError(
                    f"{work} holds sharding work begun before --bos existed, without a BOS before each "
                    f"document; --bos auto now adds this tokenizer's (id {plan['bos']}): continue it with "
                    "--bos never, or remove the work directory to start over with the BOS"
                )
            raise CorpusError(
                f"{work} holds the work of another sharding run (other inputs or options); "
                "remove it, or run with the same arguments to continue it"
            )
        return old
    tmp = path.with_name(f"{PLAN}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(plan, indent=1))
    os.replace(tmp, path)
    return plan


def _without(plan: dict, *keys: str) -> dict:
    return {k: v for k, v in plan.items() if k not in keys}


def input_stamps(pieces: list[Piece]) -> dict[str, list[int]]:
    """[size, mtime_ns] of every local input file (for a saved dataset: of each of its files), so
    that an input replaced or rewritten between runs makes another plan and its old tokens are
    never reused. Remote inputs get none: a stat per object is a round trip, and objects in a
    store are usually written once."""
    stamps: dict[str, list[int]] = {}
    for path in dict.fromkeys(p.path for p in pieces):
        if is_remote(path):
            continue
        local = Path(path.removeprefix("file://"))
        for f in sorted(local.iterdir()) if local.is_dir() else [local]:
            if f.is_file():
                st = f.stat()
                stamps[str(f)] = [st.st_size, st.st_mtime_ns]
    return stamps


def _changed_input(old: dict, new: dict) -> str | None:
    """The first input of both plans whose stamp differs (its content changed), else None."""
    before = old.get("input_stamps", {})
    return next((f for f, stamp in new["input_stamps"].items() if f in before and before[f] != stamp), None)


def tokenize_task(
    plan: dict,
    output: str | os.PathLike,
    tokenizer,
    *,
    workers: int = 1,
    task_index: int = 0,
    num_tasks: int = 1,
    progress: bool = True,
) -> dict:
    """Phase 1 for this task's pieces (index ≡ task_index mod num_tasks) not done yet."""
    if not 0 <= task_index < num_tasks:
        raise CorpusError(f"--task-index must be in [0, {num_tasks}), got {task_index}")
    work = work_dir(output)
    todo = [
        Piece(**p)
        for p in plan["pieces"]
        if p["index"] % num_tasks == task_index and not _is_done(work, p["index"], plan["id"])
    ]
    meter = Meter("tokenize", "docs", progress)
    kwargs = {
        "separator": plan["separator"],
        "dtype": np.dtype(plan["dtype"]),
        "splits": plan["splits"],
        "valid_fraction": plan["valid_fraction"],
        "text_field": plan["text_field"],
        "plan_id": plan["id"],
        "bos": plan.get("bos"),
    }
    try:
        records = run_tasks(
            _tokenize_one,
            todo,
            workers=workers,
            args=(work, BatchEncoder(tokenizer), kwargs),
            progress=meter.update,
        )
    finally:
        meter.close()
    docs = sum(c["documents"] for r in records for c in r["splits"].values())
    tokens = sum(c["tokens"] for r in records for c in r["splits"].values())
    return {"pieces": len(todo), "documents": docs, "tokens": tokens}


def _tokenize_one(piece: Piece, work: Path, encoder: BatchEncoder, kwargs: dict, progress=None) -> dict:
    if not is_remote(piece.path):
        return tokenize_piece(piece, work, encoder, progress=progress, **kwargs)
    # a broken download cannot resume mid-stream: the whole piece is read again (its files are
    # written under temporary names, so a failed attempt leaves nothing behind)
    return with_retries(
        f"tokenizing {piece.describe()}",
        lambda: tokenize_piece(piece, work, encoder, progress=progress, **kwargs),
    )


def _is_done(work: Path, index: int, plan_id: str) -> bool:
    marker = done_marker(work, index)
    return marker.exists() and json.loads(marker.read_text()).get("plan") == plan_id


def merge_shards(
    output: str | os.PathLike, *, workers: int = 1, progress: bool = True, keep_work: bool = False
) -> dict[str, dict]:
    """Phase 2: cut every shard out of the tokenized pieces, write the manifests."""
    output = Path(output)
    work = work_dir(output)
    if not (work / PLAN).exists():
        raise CorpusError(f"no sharding work in {work}: run `ds-train shard INPUT… --output {output}` first")
    plan = json.loads((work / PLAN).read_text())
    records = {}
    missing = []
    for p in plan["pieces"]:
        marker = done_marker(work, p["index"])
        record = json.loads(marker.read_text()) if marker.exists() else None
        if record is None or record.get("plan") != plan["id"]:
            missing.append(p["index"])
        else:
            records[p["index"]] = record
    if missing:
        raise CorpusError(
            f"{len(missing)} of {len(plan['pieces'])} pieces are not tokenized yet (e.g. piece {missing[0]}: "
            f"{Piece(**plan['pieces'][missing[0]]).describe()}); rerun the tasks that did not finish"
        )
    jobs: list[tuple[str, int]] = []
    streams: dict[str, tuple[SplitStream, int]] = {}
    for split in plan["splits"]:
        counts = [
            PieceCounts(i, r["splits"][split]["tokens"], r["splits"][split]["documents"])
            for i, r in sorted(records.items())
        ]
        stream = SplitStream(work, split, counts, np.dtype(plan["dtype"]))
        n_rows = packed_row_count(stream.total_tokens, plan["seq_len"], plan["pad_id"])
        if split == "train" and n_rows == 0:
            raise CorpusError(_empty_train(plan, records))
        streams[split] = (stream, n_rows)
        (output / split).mkdir(parents=True, exist_ok=True)
        _remove_stale_temporaries(output / split, split)
        jobs += [(split, j) for j in range(-(-n_rows // plan["rows_per_shard"]))]
    meter = Meter("write", "shards", progress, total=len(jobs))
    try:
        stats = run_tasks(
            _write_one, jobs, workers=workers, args=(plan, streams, output), progress=meter.update
        )
    finally:
        meter.close()
    manifests = {}
    for split in plan["splits"]:
        manifests[split] = write_manifest(
            output / split,
            split=split,
            seq_len=plan["seq_len"],
            dtype=np.dtype(plan["dtype"]),
            tokenizer=plan["tokenizer"],
            shards=[s for (sp, _), s in zip(jobs, stats) if sp == split],
            extra={
                "inputs": plan["inputs"],
                "valid_fraction": plan["valid_fraction"],
                "text_field": plan["text_field"],
                "bos_token_id": plan.get("bos"),  # None: documents start without one
            },
        )
    if not keep_work:
        shutil.rmtree(work, ignore_errors=True)
    return manifests


def _remove_stale_temporaries(split_dir: Path, split: str) -> None:
    """Remove what a merge killed mid-write left (`.<split>-NNNNNN.tar.tmp<pid>`, and the
    manifest's `index.json.tmp`): only this merge writes here now, and no finished shard set may
    carry them. Only names of our own making are touched."""
    stale = re.compile(rf"\.{re.escape(split)}-\d{{6}}\.tar\.tmp\d+")
    for f in split_dir.iterdir():
        if (stale.fullmatch(f.name) or f.name == f"{MANIFEST}.tmp") and f.is_file():
            f.unlink(missing_ok=True)


def _empty_train(plan: dict, records: dict) -> str:
    """Why the train split has no row (training would refuse the empty shard set it would make)."""
    docs = {s: sum(r["splits"][s]["documents"] for r in records.values()) for s in plan["splits"]}
    if docs["train"] == 0 and docs.get("valid", 0) > 0:
        return (
            f"the train split is empty: all {docs['valid']:,} documents went to validation "
            f"(--valid-fraction {plan['valid_fraction']}); use a smaller fraction"
        )
    tokens = sum(r["splits"]["train"]["tokens"] for r in records.values())
    return (
        f"the train split holds no row of seq_len {plan['seq_len']}: {docs['train']:,} documents, "
        f"{tokens:,} tokens in {', '.join(plan['inputs'])}"
    )


def _write_one(job: tuple[str, int], plan: dict, streams: dict, output: Path, progress=None) -> ShardStats:
    split, j = job
    stream, n_total = streams[split]
    seq_len, per_shard = plan["seq_len"], plan["rows_per_shard"]
    first = j * per_shard
    n = min(per_shard, n_total - first)
    lo = first * seq_len
    rows = cut_rows(stream.tokens(lo, lo + (n - 1) * seq_len + seq_len + 1), n, seq_len, plan["pad_id"])
    starts, lengths = stream.documents(lo, lo + n * seq_len)
    stats = write_shard(
        output / split,
        f"{split}-{j:06d}.tar",
        rows,
        row_doc_starts(starts, lo, n, seq_len),
        plan["rows_per_member"],
        lengths,
    )
    if progress is not None:
        progress(1, stats.tokens)
    return stats
