"""Stream the documents of one input piece (see corpus_pieces.py) without loading a file into memory.

- `.jsonl` / `.ndjson`: one JSON object per line, text in `text_field`
- `.txt`: one document per line (blank lines skipped)
- `.parquet`: the `text_field` column, a run of row groups at a time (pyarrow)
- `.json`, `.csv`, `.arrow`: through `datasets` in streaming mode
- a directory written by `datasets`' save_to_disk: a range of rows (memory-mapped arrow)
- any file format compressed as `.gz`, `.bz2`, `.xz` or `.zst`
- remote inputs (`http(s)://`, `s3://`, any fsspec URL) streamed, never downloaded whole

Empty, null and whitespace-only texts are skipped in every format: they would only add an EOS
token (and a space) to the stream. Text is UTF-8 in every format: a byte-order mark at the start of
a line file is dropped (Windows tools write one; it made a .jsonl fail and sat in a .txt's first
document), and bytes that are not UTF-8 are an error naming the line, in .txt as in .jsonl (a .txt
had them replaced by U+FFFD, silently).

A line file is sliced by byte range the way Hadoop splits text: a piece owns the lines whose first
byte lies in its range, so every line belongs to exactly one piece whatever the slicing.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

from ds_train.data.corpus_pieces import (
    DATASETS_FORMATS,
    CorpusError,
    Piece,
    formats_of,
    is_remote,
    plan_pieces,
)
from ds_train.data.decompress import codec_errors, decompressed

__all__ = ["CorpusError", "iter_documents", "iter_piece_documents"]

READ_BUFFER = 1 << 20
RECORD_BATCH = 1024


def iter_documents(path: str, text_field: str = "text") -> Iterator[str]:
    """Every document of one input file (or saved dataset directory), in order."""
    for piece in plan_pieces([path]):
        yield from iter_piece_documents(piece, text_field)


def iter_piece_documents(piece: Piece, text_field: str = "text") -> Iterator[str]:
    if piece.kind == "lines":
        yield from _iter_lines(piece, text_field)
    elif piece.kind == "parquet":
        yield from _iter_parquet(piece, text_field)
    elif piece.kind == "saved":
        yield from _iter_saved(piece, text_field)
    else:
        fmt, _ = formats_of(piece.path)
        yield from _iter_with_datasets(piece.path, DATASETS_FORMATS[fmt], text_field)


def _iter_lines(piece: Piece, text_field: str) -> Iterator[str]:
    fmt, compression = formats_of(piece.path)
    is_txt = fmt == ".txt"
    with _open_binary(piece.path, compression) as fh, codec_errors(piece.path, compression):
        pos = 0
        if piece.start > 0:
            # the line holding byte start-1 belongs to the previous piece (it started there)
            fh.seek(piece.start - 1)
            pos = piece.start - 1 + len(fh.readline())
        stop = piece.stop if piece.stop >= 0 else float("inf")
        while pos < stop:
            line = fh.readline()
            if not line:
                break
            where = pos
            pos += len(line)
            if where == 0:
                line = line.removeprefix(BOM)
            if is_txt:
                try:
                    text = line.rstrip(b"\r\n").decode("utf-8")
                except UnicodeDecodeError as e:
                    raise CorpusError(
                        f"{piece.path}: line at byte {where}: not UTF-8 (byte {where + e.start}: "
                        f"{line[e.start : e.start + 1]!r}); convert the file, e.g. iconv -f latin1 -t utf-8"
                    ) from None
                if _worth_keeping(text):
                    yield text
                continue
            if not line.strip():
                continue
            try:
                record = json.loads(line.decode("utf-8"))  # str: skips json's encoding sniffing
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                msg = getattr(e, "msg", str(e))
                raise CorpusError(f"{piece.path}: line at byte {where}: not valid JSON ({msg})") from None
            text = _text_of(record, text_field, f"{piece.path}: line at byte {where}")
            if _worth_keeping(text):
                yield text


BOM = b"\xef\xbb\xbf"  # UTF-8's byte-order mark


def _worth_keeping(text: str | None) -> bool:
    """A document with something to tokenize (not empty, null or only whitespace)."""
    return bool(text) and not text.isspace()


def _text_of(record, field: str, where: str) -> str | None:
    if not isinstance(record, dict) or field not in record:
        keys = list(record)[:8] if isinstance(record, dict) else type(record).__name__
        raise CorpusError(f"{where}: no '{field}' field (found {keys}); pass --text-field")
    value = record[field]
    if value is not None and not isinstance(value, str):
        raise CorpusError(f"{where}: field '{field}' is {type(value).__name__}, not text")
    return value


def _open_binary(path: str, compression: str | None):
    if is_remote(path):
        from ds_train.data.remote import BackendMissing, open_stream

        try:
            raw = open_stream(path)
        except (FileNotFoundError, PermissionError, BackendMissing) as e:
            # not transient (404, 403, no fsspec backend): an input error, named in one line
            raise CorpusError(str(e) if str(e).startswith(path) else f"{path}: {e}") from None
    else:
        try:
            raw = open(path.removeprefix("file://"), "rb", buffering=READ_BUFFER)
        except FileNotFoundError:
            raise CorpusError(f"input not found: {path}") from None
    return decompressed(raw, compression, path)


def _iter_parquet(piece: Piece, text_field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(piece.path)
    if text_field not in pf.schema_arrow.names:
        raise CorpusError(
            f"{piece.path}: no '{text_field}' column (found {pf.schema_arrow.names[:8]}); pass --text-field"
        )
    groups = list(range(piece.start, piece.stop))
    for batch in pf.iter_batches(batch_size=RECORD_BATCH, row_groups=groups, columns=[text_field]):
        column = batch.column(0)
        if not (column.type.equals("string") or column.type.equals("large_string")):
            raise CorpusError(f"{piece.path}: column '{text_field}' is {column.type}, not text")
        for text in column.to_pylist():
            if _worth_keeping(text):
                yield text


def _iter_saved(piece: Piece, text_field: str) -> Iterator[str]:
    from datasets import load_from_disk

    ds = load_from_disk(piece.path)
    if text_field not in ds.column_names:
        raise CorpusError(
            f"{piece.path}: no '{text_field}' column (found {ds.column_names[:8]}); pass --text-field"
        )
    ds = ds.select_columns([text_field])
    for lo in range(piece.start, piece.stop, RECORD_BATCH):
        for i, text in enumerate(ds[lo : min(lo + RECORD_BATCH, piece.stop)][text_field]):
            if text is not None and not isinstance(text, str):
                raise CorpusError(f"{piece.path} row {lo + i}: '{text_field}' is not text")
            if _worth_keeping(text):
                yield text


def _iter_with_datasets(path: str, builder: str, text_field: str) -> Iterator[str]:
    from datasets import load_dataset

    # datasets decompresses .gz/.bz2/.xz/.zst itself (already while inferring the schema in
    # load_dataset): a truncated file ends in a bare EOFError
    with codec_errors(path, formats_of(path)[1]):
        ds = load_dataset(builder, data_files={"train": path}, split="train", streaming=True)
        for i, record in enumerate(ds):
            text = _text_of(record, text_field, f"{path} record {i}")
            if _worth_keeping(text):
                yield text
