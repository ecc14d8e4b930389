"""Sharder inputs: every supported format gives the same shards as the same documents in JSON lines."""

from __future__ import annotations

import bz2
import csv
import gzip
import json
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from ds_train.data.corpus_pieces import CorpusError, plan_pieces
from ds_train.data.corpus_reader import iter_documents, iter_piece_documents
from ds_train.data.sharding import ShardOptions, shard_corpus
from tests.helpers import TOKENIZER


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TOKENIZER))


@pytest.fixture(scope="module")
def texts(corpus) -> list[str]:
    # one line each, so that the .txt format (a document per line) holds the same documents
    docs = [json.loads(line)["text"] for line in corpus.read_text().splitlines()][:150]
    return [" ".join(d.split()) for d in docs if d.strip()]


def _shard(inputs, out: Path, tok, **kw) -> list[str]:
    """sha256 of every shard written (the manifest lists input paths, so compare shards only)."""
    opts = ShardOptions(seq_len=32, rows_per_shard=100, progress=False, **kw)
    manifest = shard_corpus([str(i) for i in inputs], out, tok, opts)["train"]
    return [s["sha256"] for s in manifest["shards"]]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, texts, tok) -> list[str]:
    d = tmp_path_factory.mktemp("jsonl")
    path = d / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return _shard([path], d / "out", tok)


def _write_jsonl(path: Path, texts, opener=open) -> Path:
    with opener(path, "wt", encoding="utf-8") as fh:
        for t in texts:
            fh.write(json.dumps({"text": t}) + "\n")
    return path


def _zst_writer(path, mode, encoding):
    import io

    import zstandard

    return io.TextIOWrapper(zstandard.ZstdCompressor().stream_writer(open(path, "wb")), encoding=encoding)


@pytest.mark.parametrize(
    "name",
    ["txt", "jsonl.gz", "jsonl.bz2", "jsonl.zst", "parquet", "csv", "json", "saved", "directory", "glob"],
)
def test_every_format_gives_the_same_shards(name, tmp_path, texts, tok, reference):
    if name == "txt":
        src = tmp_path / "docs.txt"
        src.write_text("\n\n".join(texts) + "\n")  # blank lines are skipped
    elif name == "jsonl.gz":
        src = _write_jsonl(tmp_path / "docs.jsonl.gz", texts, gzip.open)
    elif name == "jsonl.bz2":
        src = _write_jsonl(tmp_path / "docs.jsonl.bz2", texts, bz2.open)
    elif name == "jsonl.zst":
        src = _write_jsonl(tmp_path / "docs.jsonl.zst", texts, _zst_writer)
    elif name == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        src = tmp_path / "docs.parquet"
        table = pa.table({"id": list(range(len(texts))), "text": texts})
        pq.write_table(table, src, row_group_size=16)  # several row groups → several pieces
        assert len(plan_pieces([str(src)], piece_bytes=2000)) > 3
    elif name == "csv":
        src = tmp_path / "docs.csv"
        with open(src, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["id", "text"])
            w.writerows(enumerate(texts))
    elif name == "json":
        src = tmp_path / "docs.json"
        src.write_text(json.dumps([{"text": t} for t in texts]))
    elif name == "saved":
        from datasets import Dataset

        src = tmp_path / "saved"
        Dataset.from_dict({"text": texts}).save_to_disk(str(src))
        assert len(plan_pieces([str(src)], piece_bytes=2000)) > 3
    elif name == "directory":
        src = tmp_path / "dir"
        (src / "b").mkdir(parents=True)
        _write_jsonl(src / "a.jsonl", texts[:60])  # files are taken in sorted path order
        _write_jsonl(src / "b" / "c.jsonl.gz", texts[60:], gzip.open)
        (src / "README.md").write_text("not data")
    else:
        d = tmp_path / "parts"
        d.mkdir()
        _write_jsonl(d / "part-0.jsonl", texts[:70])
        _write_jsonl(d / "part-1.jsonl", texts[70:])
        src = str(d / "part-*.jsonl")
    assert _shard([src], tmp_path / "out", tok, piece_bytes=2000) == reference


def test_line_pieces_own_each_line_exactly_once(tmp_path):
    lines = [f'{{"text": "{"x" * (i % 23)}{i}"}}' for i in range(200)]
    src = tmp_path / "d.jsonl"
    src.write_text("\n".join(lines) + "\n")
    want = [json.loads(line)["text"] for line in lines]
    for piece_bytes in (1, 7, 19, 64, 1000, 10**6):
        pieces = plan_pieces([str(src)], piece_bytes)
        got = [t for p in pieces for t in iter_piece_documents(p)]
        assert got == want, piece_bytes


def test_missing_and_unsupported_inputs_are_named(tmp_path):
    with pytest.raises(CorpusError, match="input not found"):
        plan_pieces([str(tmp_path / "nope.jsonl")])
    (tmp_path / "a.docx").write_text("x")
    with pytest.raises(CorpusError, match="unsupported input format '.docx'"):
        plan_pieces([str(tmp_path / "a.docx")])
    with pytest.raises(CorpusError, match="no input matches"):
        plan_pieces([str(tmp_path / "*.parquet")])
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "p.parquet")
    with pytest.raises(CorpusError, match="no 'text' column"):
        list(iter_documents(str(tmp_path / "p.parquet")))


@pytest.fixture
def http_dir(tmp_path):
    """A local HTTP server on 127.0.0.1 serving tmp_path."""
    handler = partial(_QuietHandler, directory=str(tmp_path))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield tmp_path, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def test_remote_http_input_is_streamed(http_dir, texts, tok, reference):
    root, url = http_dir
    _write_jsonl(root / "docs.jsonl.gz", texts, gzip.open)
    assert _shard([f"{url}/docs.jsonl.gz"], root / "out", tok) == reference


def test_a_glob_walks_the_directories_it_matches_and_each_file_is_read_once(tmp_path, caplog):
    from ds_train.data.corpus_pieces import expand_inputs

    (tmp_path / "web").mkdir()
    (tmp_path / "code").mkdir()
    (tmp_path / "empty").mkdir()
    (tmp_path / "web" / "p.jsonl").write_text('{"text": "w1"}\n')
    (tmp_path / "code" / "p.jsonl").write_text('{"text": "c1"}\n')
    (tmp_path / "code" / "NOTES.md").write_text("skipped as a directory walk skips it")
    (tmp_path / "top.txt").write_text("a\nb\n")
    top, code, web = (str(tmp_path / p) for p in ("top.txt", "code/p.jsonl", "web/p.jsonl"))
    assert expand_inputs([f"{tmp_path}/*"]) == [code, top, web]
    assert expand_inputs([f"{tmp_path}/*/"]) == [code, web]
    with caplog.at_level("WARNING"):
        assert expand_inputs([top, f"{tmp_path}/*.txt", str(tmp_path)]) == [top, code, web]
    assert f"{top}: reached by more than one input" in caplog.text
    with pytest.raises(CorpusError, match="the matches hold no corpus files"):
        expand_inputs([f"{tmp_path}/empt*"])


def test_a_missing_remote_input_is_named(http_dir, tok):
    root, url = http_dir
    with pytest.raises(CorpusError, match=rf"^{url}/nothere.jsonl: not found \(HTTP 404\)$"):
        _shard([f"{url}/nothere.jsonl"], root / "out", tok)


def test_a_shard_set_inside_a_corpus_directory_is_skipped(tmp_path, tok, caplog):
    from ds_train.data.corpus_pieces import expand_inputs

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    _write_jsonl(corpus / "docs.jsonl", ["one document", "another document"])
    shard_corpus([str(corpus)], corpus / "shards", tok, ShardOptions(seq_len=8, progress=False))
    with caplog.at_level("WARNING"):
        assert expand_inputs([str(corpus)]) == [str(corpus / "docs.jsonl")]
    assert f"{corpus / 'shards' / 'train'}: a ds-train shard set, not corpus: skipped" in caplog.text
