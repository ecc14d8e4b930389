"""Cut the sharder's inputs into pieces: the unit of parallel work, fixed before any worker starts.

A piece is a slice of one input (a byte range of an uncompressed line file, a run of parquet row
groups, a row range of a saved `datasets` directory, or a whole file when it cannot be sliced:
compressed or remote files, JSON/CSV/arrow read through `datasets`). Pieces are numbered in input
order and the token stream of a split is their concatenation, so the output depends only on the
inputs, never on how many workers or Slurm tasks tokenized the pieces — nor on the piece size.
"""

from __future__ import annotations

import glob
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

COMPRESSIONS = {".gz", ".bz2", ".xz", ".zst"}
LINE_FORMATS = {".jsonl", ".ndjson", ".txt"}
DATASETS_FORMATS = {".json": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
MAX_PIECE_BYTES = 16 << 20
MIN_PIECE_BYTES = 1 << 20
PIECES_PER_CORPUS = 256  # enough pieces to keep every worker busy to the end

log = logging.getLogger(__name__)


class CorpusError(ValueError):
    """A problem with a corpus input, named with its path (and line or record where known)."""


@dataclass(frozen=True)
class Piece:
    index: int  # position in the output stream
    path: str
    kind: str  # "lines" | "parquet" | "datasets" | "saved"
    start: int = 0  # lines: byte offset; parquet: first row group; saved: first row
    stop: int = -1  # exclusive; -1 = to the end of the input

    def to_json(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        whole = self.start == 0 and self.stop == -1
        unit = {"lines": "bytes", "parquet": "row groups", "saved": "rows"}.get(self.kind, "")
        return self.path if whole else f"{self.path} [{unit} {self.start}:{self.stop}]"


def is_remote(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def formats_of(path: str) -> tuple[str, str | None]:
    """(format suffix, compression suffix or None) of an input path."""
    suffixes = [s.lower() for s in Path(path.split("?")[0]).suffixes]
    compression = suffixes.pop() if suffixes and suffixes[-1] in COMPRESSIONS else None
    fmt = suffixes[-1] if suffixes else ""
    if fmt not in LINE_FORMATS and fmt not in DATASETS_FORMATS:
        raise CorpusError(
            f"{path}: unsupported input format '{fmt or '(none)'}' "
            f"(use .jsonl, .txt, .json, .parquet, .csv, .arrow, optionally .gz/.zst/.bz2/.xz, "
            "or a directory written by datasets' save_to_disk)"
        )
    return fmt, compression


def expand_inputs(inputs: list[str]) -> list[str]:
    """Input files in stream order: directories are walked (sorted), globs expanded (sorted, a
    matched directory walked like a directory input); a file reached twice is read once."""
    out: list[str] = []
    for item in map(str, inputs):
        if is_remote(item):
            out.append(item)
        elif any(c in item for c in "*?[") and not Path(item).exists():
            out.extend(_expand_glob(item))
        elif Path(item).is_dir():
            out.extend(_walk(Path(item)))
        elif Path(item).is_file():
            out.append(item)
        else:
            raise CorpusError(f"input not found: {item}")
    return _once_each(out)


def _expand_glob(pattern: str) -> list[str]:
    matches = sorted(glob.glob(pattern, recursive=True))
    if not matches:
        raise CorpusError(f"no input matches {pattern}")
    found: list[str] = []
    for m in matches:
        if Path(m).is_dir():
            # a matched directory without corpus files (logs/, a checkout's .git) is no error here
            found.extend(_corpus_files(Path(m)))
        elif Path(m).is_file():
            found.append(m)
    if not found:
        raise CorpusError(f"{pattern}: the matches hold no corpus files (looked for {_LOOKED_FOR})")
    return found


def _once_each(paths: list[str]) -> list[str]:
    """`paths` without the repeats of a file already listed (the same file reached through a
    glob, its directory or a link), which would otherwise be tokenized once per mention."""
    seen: set[str] = set()
    out: list[str] = []
    repeated: dict[str, None] = {}  # the files met again, in order, each once
    for p in paths:
        key = p if is_remote(p) else os.path.realpath(p.removeprefix("file://"))
        if key in seen:
            repeated[key] = None
            continue
        seen.add(key)
        out.append(p)
    if repeated:
        first = next(iter(repeated))
        more = f" (and {len(repeated) - 1} other files)" if len(repeated) > 1 else ""
        log.warning("%s%s: reached by more than one input (glob, directory, link): read once", first, more)
    return out


def _walk(root: Path) -> list[str]:
    found = _corpus_files(root)
    if not found:
        raise CorpusError(f"{root}: no corpus files inside (looked for {_LOOKED_FOR})")
    return found


_LOOKED_FOR = ".jsonl/.txt/.json/.parquet/.csv/.arrow"


def _corpus_files(root: Path) -> list[str]:
    """The corpus files under directory `root`, in sorted path order (hidden names and files of
    other formats skipped); a saved dataset directory is one input."""
    if is_saved_dataset(root):
        return [str(root)]
    found = []
    shard_sets = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        here = Path(dirpath)
        if here != root and is_saved_dataset(here):
            found.append(str(here))
            dirnames[:] = []
            continue
        if is_shard_set(here):
            # an earlier `ds-train shard --output` inside the corpus: its index.json is no corpus
            shard_sets.append(str(here))
            dirnames[:] = []
            continue
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            try:
                formats_of(name)
            except CorpusError:
                continue  # READMEs, checksums, ... next to the data
            found.append(str(here / name))
    if shard_sets:
        more = f" (and {len(shard_sets) - 1} more)" if len(shard_sets) > 1 else ""
        log.warning("%s%s: a ds-train shard set, not corpus: skipped", shard_sets[0], more)
    return found


def is_shard_set(path: Path) -> bool:
    """A directory holding a ds-train shard set manifest (`index.json`, format first)."""
    from ds_train.data.shard_format import FORMAT, MANIFEST

    manifest = path / MANIFEST
    if not manifest.is_file():
        return False
    with open(manifest, "rb") as fh:
        return f'"format": "{FORMAT}"'.encode() in fh.read(4096)  # the first key: no need to parse it all


def is_saved_dataset(path: Path) -> bool:
    """A directory written by `datasets`' save_to_disk (a Dataset, not a DatasetDict)."""
    return (path / "dataset_info.json").is_file() and (path / "state.json").is_file()


def plan_pieces(inputs: list[str], piece_bytes: int | None = None) -> list[Piece]:
    """All pieces of `inputs`, in stream order; reads file sizes and parquet/arrow metadata only.

    By default a piece is 1/256 of the local input bytes, within [1 MB, 16 MB]: a function of
    the inputs alone (never of the worker count), small enough that workers finish together."""
    paths = expand_inputs(inputs)
    if piece_bytes is None:
        total = sum(os.path.getsize(p) for p in paths if not is_remote(p) and Path(p).is_file())
        piece_bytes = min(MAX_PIECE_BYTES, max(MIN_PIECE_BYTES, total // PIECES_PER_CORPUS))
    pieces: list[Piece] = []
    for path in paths:
        for kind, start, stop in _slices(path, piece_bytes):
            pieces.append(Piece(len(pieces), path, kind, start, stop))
    return pieces


def _slices(path: str, piece_bytes: int) -> list[tuple[str, int, int]]:
    if not is_remote(path) and is_saved_dataset(Path(path)):
        return _saved_slices(path, piece_bytes)
    fmt, compression = formats_of(path)
    if fmt in LINE_FORMATS:
        if compression or is_remote(path):
            return [("lines", 0, -1)]  # a compressed stream cannot be entered in the middle
        size = os.path.getsize(path)
        if size == 0:
            return []
        return [("lines", lo, min(lo + piece_bytes, size)) for lo in range(0, size, piece_bytes)]
    if fmt == ".parquet" and not compression and not is_remote(path):
        return _parquet_slices(path, piece_bytes)
    return [("datasets", 0, -1)]


def _parquet_slices(path: str, piece_bytes: int) -> list[tuple[str, int, int]]:
    import pyarrow.parquet as pq

    try:
        meta = pq.ParquetFile(path).metadata
    except Exception as e:  # pyarrow raises several types for a bad footer
        raise CorpusError(f"{path}: not a readable parquet file ({e})") from None
    out, lo, acc = [], 0, 0
    for g in range(meta.num_row_groups):
        acc += meta.row_group(g).total_byte_size
        if acc >= piece_bytes:
            out.append(("parquet", lo, g + 1))
            lo, acc = g + 1, 0
    if lo < meta.num_row_groups:
        out.append(("parquet", lo, meta.num_row_groups))
    return out


def _saved_slices(path: str, piece_bytes: int) -> list[tuple[str, int, int]]:
    from datasets import load_from_disk

    ds = load_from_disk(path)
    if not hasattr(ds, "num_rows") or isinstance(ds.num_rows, dict):
        raise CorpusError(f"{path}: a saved DatasetDict; pass one split's directory (e.g. {path}/train)")
    n = ds.num_rows
    nbytes = max(1, int(ds.data.nbytes))
    per = max(1, int(n * piece_bytes / nbytes))
    return [("saved", lo, min(lo + per, n)) for lo in range(0, n, per)]
