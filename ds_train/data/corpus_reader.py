"""Stream documents out of raw corpus files without loading a file into memory.

- `.jsonl` / `.ndjson`: one JSON object per line, text in `text_field`
- `.txt`: one document per line (blank lines skipped)
- `.json`, `.parquet`, `.csv`, `.arrow`: through `datasets` in streaming mode
- any of the above compressed as `.gz`, `.bz2`, `.xz` or `.zst`
- remote inputs (`http(s)://`, `s3://`) through fsspec when it is installed
"""

from __future__ import annotations

import bz2
import gzip
import io
import json
import lzma
from collections.abc import Iterator
from pathlib import Path

COMPRESSIONS = {".gz", ".bz2", ".xz", ".zst"}
LINE_FORMATS = {".jsonl", ".ndjson", ".txt"}
DATASETS_FORMATS = {".json": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}


class CorpusError(ValueError):
    pass


def formats_of(path: str) -> tuple[str, str | None]:
    """(format suffix, compression suffix or None) of an input path."""
    suffixes = [s.lower() for s in Path(path.split("?")[0]).suffixes]
    compression = suffixes.pop() if suffixes and suffixes[-1] in COMPRESSIONS else None
    fmt = suffixes[-1] if suffixes else ""
    if fmt not in LINE_FORMATS and fmt not in DATASETS_FORMATS:
        raise CorpusError(
            f"{path}: unsupported input format '{fmt or '(none)'}' "
            f"(use .jsonl, .txt, .json, .parquet, .csv, .arrow, optionally .gz/.zst/.bz2/.xz)"
        )
    return fmt, compression


def iter_documents(path: str, text_field: str = "text") -> Iterator[str]:
    fmt, compression = formats_of(path)
    if fmt in LINE_FORMATS:
        with _open_text(path, compression) as fh:
            for lineno, line in enumerate(fh, 1):
                if fmt == ".txt":
                    if line.strip():
                        yield line.rstrip("\n")
                    continue
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise CorpusError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
                yield _text_of(record, text_field, f"{path}:{lineno}")
        return
    yield from _iter_with_datasets(path, DATASETS_FORMATS[fmt], compression, text_field)


def _text_of(record, field: str, where: str) -> str:
    if not isinstance(record, dict) or field not in record:
        keys = list(record)[:8] if isinstance(record, dict) else type(record).__name__
        raise CorpusError(f"{where}: no '{field}' field (found {keys}); pass --text-field")
    value = record[field]
    if not isinstance(value, str):
        raise CorpusError(f"{where}: field '{field}' is {type(value).__name__}, not text")
    return value


def _open_text(path: str, compression: str | None) -> io.TextIOBase:
    raw = _open_binary(path)
    if compression == ".gz":
        raw = gzip.GzipFile(fileobj=raw)
    elif compression == ".bz2":
        raw = bz2.BZ2File(raw)
    elif compression == ".xz":
        raw = lzma.LZMAFile(raw)
    elif compression == ".zst":
        import zstandard

        raw = zstandard.ZstdDecompressor().stream_reader(raw)
    return io.TextIOWrapper(raw, encoding="utf-8", errors="replace")


def _open_binary(path: str):
    if "://" in path:
        try:
            import fsspec
        except ImportError:
            raise CorpusError(f"{path}: install fsspec (and s3fs for s3://) to read remote inputs") from None
        return fsspec.open(path, "rb").open()
    if not Path(path).is_file():
        raise CorpusError(f"input not found: {path}")
    return open(path, "rb")


def _iter_with_datasets(path: str, builder: str, compression: str | None, text_field: str) -> Iterator[str]:
    from datasets import load_dataset

    if not ("://" in path or Path(path).is_file()):
        raise CorpusError(f"input not found: {path}")
    ds = load_dataset(builder, data_files={"train": path}, split="train", streaming=True)
    for i, record in enumerate(ds):
        yield _text_of(record, text_field, f"{path} record {i}")
