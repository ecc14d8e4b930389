"""Bad sharder inputs are refused in one line naming the file, and leave nothing half-written."""

from __future__ import annotations

import bz2
import gzip
import json
import lzma

import pytest

from ds_train.data.corpus_pieces import CorpusError
from ds_train.data.corpus_reader import iter_documents
from ds_train.data.sharding import ShardOptions, shard_corpus
from tests.helpers import TOKENIZER


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TOKENIZER))


def _zst(data: bytes) -> bytes:
    import zstandard

    return zstandard.ZstdCompressor().compress(data)


CODECS = {"gz": gzip.compress, "bz2": bz2.compress, "xz": lzma.compress, "zst": _zst}


@pytest.mark.parametrize("codec", sorted(CODECS))
def test_a_truncated_compressed_input_is_refused_by_name(codec, tmp_path, tok):
    data = "".join(json.dumps({"text": f"doc {i} " * 20}) + "\n" for i in range(3000)).encode()
    whole = CODECS[codec](data)
    src = tmp_path / f"cut.jsonl.{codec}"
    src.write_bytes(whole[: len(whole) // 2])
    good = tmp_path / "good.jsonl"
    good.write_bytes(data[:20000].rsplit(b"\n", 1)[0] + b"\n")
    out = tmp_path / "out"
    out.mkdir()  # made beforehand: the CLI would not take it away, so the sharder must clean up
    opts = ShardOptions(seq_len=32, progress=False, workers=2, piece_bytes=4000)
    with pytest.raises(
        CorpusError, match=rf"{src}: compressed stream ends before its end marker \(truncated\)"
    ):
        shard_corpus([str(good), str(src)], out, tok, opts)
    assert not [p.name for p in out.rglob("*.tmp*")]


def test_a_multi_frame_zst_input_is_read_whole(tmp_path):
    src = tmp_path / "two.txt.zst"
    src.write_bytes(_zst(b"a\nb\n") + _zst(b"c\n") + _zst(b""))
    assert list(iter_documents(str(src))) == ["a", "b", "c"]


@pytest.mark.parametrize("fmt", ["json", "csv"])
def test_a_truncated_input_read_through_datasets_is_refused_by_name(fmt, tmp_path):
    """.json/.csv (read by `datasets`, which decompresses them itself) raised a bare EOFError."""
    rows = [f"document {i} " + "word " * 40 for i in range(2000)]
    if fmt == "json":
        data = "".join(json.dumps({"text": t}) + "\n" for t in rows)
    else:
        data = "text\n" + "".join(f"{t}\n" for t in rows)
    whole = gzip.compress(data.encode())
    src = tmp_path / f"cut.{fmt}.gz"
    src.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(CorpusError, match=rf"{src}: compressed stream ends before its end marker"):
        list(iter_documents(str(src)))


def test_corrupt_bz2_is_named(tmp_path):
    data = bytearray(
        bz2.compress("".join(json.dumps({"text": f"d {i}"}) + "\n" for i in range(5000)).encode())
    )
    data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)
    src = tmp_path / "bad.jsonl.bz2"
    src.write_bytes(bytes(data))
    with pytest.raises(CorpusError, match=rf"{src}: not a valid .bz2 stream \(Invalid data stream\)"):
        list(iter_documents(str(src)))


def test_messy_text_is_read_alike_in_every_line_format(tmp_path):
    """A byte-order mark is dropped (it failed a .jsonl, and sat in a .txt's first document),
    whitespace-only documents are skipped (a .jsonl kept them), and bytes that are not UTF-8 are
    an error naming the line in .txt as in .jsonl (a .txt replaced them with U+FFFD, silently)."""
    bom = b"\xef\xbb\xbf"
    (tmp_path / "a.txt").write_bytes(bom + b"first doc\n   \nsecond doc\n")
    (tmp_path / "a.jsonl").write_bytes(
        bom + b'{"text": "first doc"}\n{"text": "  \\n "}\n{"text": "second doc"}\n'
    )
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    pq.write_table(pa.table({"text": ["first doc", " \t", None, "second doc"]}), tmp_path / "a.parquet")
    for name in ("a.txt", "a.jsonl", "a.parquet"):
        assert list(iter_documents(str(tmp_path / name))) == ["first doc", "second doc"], name
    (tmp_path / "b.txt").write_bytes(b"fine\ncaf\xe9 au lait\n")
    with pytest.raises(CorpusError, match=r"b.txt: line at byte 5: not UTF-8 \(byte 8: b'\\xe9'\)"):
        list(iter_documents(str(tmp_path / "b.txt")))
    (tmp_path / "b.jsonl").write_bytes(b'{"text": "caf\xe9"}\n')
    with pytest.raises(CorpusError, match=r"b.jsonl: line at byte 0: not valid JSON"):
        list(iter_documents(str(tmp_path / "b.jsonl")))
