"""The sharder: identical output whatever the parallelism, lossless, readable by stock tools."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest

from ds_train.data.corpus_pieces import CorpusError
from ds_train.data.sharding import (
    ShardOptions,
    is_valid_doc,
    merge_shards,
    prepare_plan,
    shard_corpus,
    tokenize_task,
    work_dir,
)
from tests.helpers import TOKENIZER, file_digests

SEQ = 32


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TOKENIZER))


def _opts(**kw) -> ShardOptions:
    base = {
        "seq_len": SEQ,
        "valid_fraction": 0.1,
        "rows_per_shard": 150,
        "member_bytes": 2000,
        "progress": False,
    }
    return ShardOptions(**{**base, **kw})


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus, tok) -> Path:
    out = tmp_path_factory.mktemp("ref")
    shard_corpus([str(corpus)], out, tok, _opts())
    return out


def test_output_identical_whatever_the_workers_tasks_and_piece_size(tmp_path, corpus, tok, reference):
    ref = file_digests(reference)
    assert {"train/index.json", "valid/index.json", "train/train-000000.tar"} <= set(ref)
    assert not work_dir(reference).exists()  # the work directory is gone after the merge

    two = tmp_path / "two_workers"
    shard_corpus([str(corpus)], two, tok, _opts(workers=2, piece_bytes=7_000))
    assert file_digests(two) == ref

    # a Slurm array of 3 tasks (each tokenizing its pieces), then the merge with 2 writers
    arr = tmp_path / "array"
    opts = _opts(piece_bytes=5_000)
    for i in (2, 0, 1):  # tasks finish in any order
        plan = prepare_plan([str(corpus)], arr, tok, opts)
        done = tokenize_task(plan, arr, tok, task_index=i, num_tasks=3, progress=False)
        assert done["pieces"] == len(range(i, len(plan["pieces"]), 3)) > 0
    assert merge_shards(arr, workers=2, progress=False)["train"]["total_rows"] > 0
    assert file_digests(arr) == ref


def test_array_mode_through_the_cli_and_an_unfinished_task(tmp_path, corpus, reference):
    from ds_train.cli import main

    out = tmp_path / "cli"
    common = ["--output", str(out), "--tokenizer", str(TOKENIZER), "--seq-len", str(SEQ)]
    common += ["--valid-fraction", "0.1", "--rows-per-shard", "150", "--member-size", "2000"]
    common += ["--piece-size", "6000", "--no-progress"]
    assert main(["shard", str(corpus), *common, "--task-index", "0", "--num-tasks", "2"]) == 0
    with pytest.raises(CorpusError, match="not tokenized yet"):
        merge_shards(out, progress=False)
    # a re-run of a finished task has nothing left to do; the other task completes the work
    assert main(["shard", str(corpus), *common, "--task-index", "1", "--num-tasks", "2"]) == 0
    assert main(["shard", "--merge", "--output", str(out), "--no-progress"]) == 0
    assert file_digests(out) == file_digests(reference)


def test_a_changed_plan_does_not_reuse_old_work(tmp_path, corpus, tok):
    plan = prepare_plan([str(corpus)], tmp_path, tok, _opts())
    tokenize_task(plan, tmp_path, tok, task_index=0, num_tasks=2, progress=False)
    with pytest.raises(CorpusError, match="another sharding run"):
        prepare_plan([str(corpus)], tmp_path, tok, _opts(seq_len=64))
    # the same arguments continue where the task stopped
    assert prepare_plan([str(corpus)], tmp_path, tok, _opts())["id"] == plan["id"]


def test_existing_shard_set_is_not_overwritten(reference, corpus, tok):
    with pytest.raises(CorpusError, match="already holds a shard set"):
        shard_corpus([str(corpus)], reference, tok, _opts())


def _rows_with_webdataset(split_dir: Path) -> tuple[np.ndarray, list[list[int]]]:
    import webdataset as wds

    manifest = json.loads((split_dir / "index.json").read_text())
    urls = [str(split_dir / s["name"]) for s in manifest["shards"]]
    rows, starts = [], []
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode():
        rows.append(sample["tokens.npy"])
        starts += sample["json"]["doc_starts"]
    return np.concatenate(rows), starts


def test_decoding_the_shards_gives_back_the_input_text(reference, corpus, tok):
    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    for split in ("train", "valid"):
        expected = [t for t in texts if is_valid_doc(t, 0.1) == (split == "valid")]
        rows, starts = _rows_with_webdataset(reference / split)
        manifest = json.loads((reference / split / "index.json").read_text())
        assert rows.shape == (manifest["total_rows"], SEQ + 1)
        assert rows.dtype == np.uint16
        stream = np.concatenate([rows[0], rows[1:, 1:].ravel()])  # rows overlap by one token
        stream = stream[stream != tok.pad_token_id]  # the padded tail of the last row
        docs = np.split(stream, np.flatnonzero(stream == tok.eos_token_id) + 1)
        decoded = [tok.decode(d[:-1].tolist()) for d in docs if len(d)]
        assert decoded == expected
        # the json members list where each document starts (columns of input positions)
        assert sum(len(s) for s in starts) == manifest["total_documents"] == len(expected)
        flat_starts = [i * SEQ + c for i, s in enumerate(starts) for c in s]
        assert flat_starts == [0, *(np.flatnonzero(stream == tok.eos_token_id)[:-1] + 1).tolist()]


def test_shards_are_plain_tar_files_for_stock_tools(reference, tmp_path):
    shard = reference / "train" / "train-000000.tar"
    listing = subprocess.run(["tar", "-tf", str(shard)], capture_output=True, text=True, check=True).stdout
    names = listing.split()
    assert names[:2] == ["train-000000-00000.json", "train-000000-00000.tokens.npy"]
    subprocess.run(["tar", "-xf", str(shard), "-C", str(tmp_path)], check=True)
    extracted = np.concatenate([np.load(tmp_path / n) for n in names if n.endswith(".npy")])
    rows, _ = _rows_with_webdataset(reference / "train")
    np.testing.assert_array_equal(extracted, rows[: len(extracted)])
    with tarfile.open(shard) as tf:  # reproducible bytes: no timestamps, fixed owner
        assert {m.mtime for m in tf.getmembers()} == {0}


def test_manifest_describes_every_shard(reference):
    manifest = json.loads((reference / "train" / "index.json").read_text())
    assert manifest["format"] == "ds_train.shards/1" and manifest["seq_len"] == SEQ
    assert manifest["dtype"] == "uint16" and manifest["tokenizer"]["sha256"]
    for s in manifest["shards"]:
        data = (reference / "train" / s["name"]).read_bytes()
        assert s["bytes"] == len(data) and s["sha256"] == hashlib.sha256(data).hexdigest()
        assert s["tokens"] == s["rows"] * (SEQ + 1)
    assert [s["rows"] for s in manifest["shards"]][:-1] == [150] * (len(manifest["shards"]) - 1)
    assert sum(manifest["doc_length_hist"]) == manifest["total_documents"]
    assert manifest["total_rows"] == sum(s["rows"] for s in manifest["shards"])


def test_progress_bar_reports_docs_and_tokens_per_second(tmp_path, corpus, tok, capsys):
    shard_corpus([str(corpus)], tmp_path, tok, _opts(progress=True))
    err = capsys.readouterr().err
    assert "docs/s" in err and "tok/s" in err


def test_pieces_are_tokenized_with_bounded_batches(tmp_path, tok, monkeypatch):
    """A big input is never read whole: documents go to the tokenizer a batch at a time."""
    import ds_train.data.piece_tokenizer as pt

    src = tmp_path / "big.jsonl"
    src.write_text("".join(json.dumps({"text": f"document number {i}"}) + "\n" for i in range(3000)))
    sizes = []
    real = pt.BatchEncoder.__call__
    monkeypatch.setattr(
        pt.BatchEncoder, "__call__", lambda self, texts: sizes.append(len(texts)) or real(self, texts)
    )
    shard_corpus([str(src)], tmp_path / "out", tok, _opts(valid_fraction=0.0))
    assert sum(sizes) == 3000 and max(sizes) <= pt.TOKENIZE_BATCH


def test_bad_json_line_names_file_and_byte(tmp_path, tok):
    src = tmp_path / "bad.jsonl"
    src.write_bytes(b'{"text": "fine"}\n{"text": broken\n')
    with pytest.raises(CorpusError, match=r"bad.jsonl: line at byte 17: not valid JSON"):
        shard_corpus([str(src)], tmp_path / "out", tok, _opts())
    src.write_bytes(b'{"body": "no text field"}\n')
    with pytest.raises(CorpusError, match="no 'text' field"):
        shard_corpus([str(src)], tmp_path / "out2", tok, _opts())


def test_worker_errors_reach_the_parent(tmp_path, tok):
    src = tmp_path / "bad.jsonl"
    src.write_bytes(b'{"text": "a"}\n' * 50 + b"not json\n")
    with pytest.raises(CorpusError, match="not valid JSON"):
        shard_corpus([str(src)], tmp_path / "out", tok, _opts(workers=2, piece_bytes=100))


def test_uint32_tokens_for_large_vocabularies():
    from ds_train.data.shard_format import token_dtype

    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32
    buf = io.BytesIO()
    np.save(buf, np.zeros((2, 3), np.uint32))
    from ds_train.data.shard_format import parse_npy_header

    assert parse_npy_header(buf.getvalue())[1:] == (np.dtype(np.uint32), (2, 3))


def test_a_replaced_input_does_not_reuse_its_old_tokens(tmp_path, corpus, tok):
    import gzip
    import os

    src = tmp_path / "docs.jsonl.gz"
    src.write_bytes(gzip.compress(corpus.read_bytes()))
    out = tmp_path / "out"
    plan = prepare_plan([str(src), str(corpus)], out, tok, _opts())
    tokenize_task(plan, out, tok, task_index=0, num_tasks=2, progress=False)  # the .gz piece is done
    src.write_bytes(gzip.compress(b'{"text": "other content"}\n'))
    os.utime(src, ns=(1, 1))
    with pytest.raises(CorpusError, match=f"{src} changed .*since the sharding work"):
        prepare_plan([str(src), str(corpus)], out, tok, _opts())


def test_a_merge_rerun_after_a_kill_leaves_no_temporaries(tmp_path, corpus, tok):
    plan = prepare_plan([str(corpus)], tmp_path, tok, _opts())
    tokenize_task(plan, tmp_path, tok, progress=False)
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / ".train-000001.tar.tmp4242").write_bytes(b"half a shard")  # a killed merge
    (tmp_path / "train" / "index.json.tmp").write_text("{")
    (tmp_path / "train" / ".mine.tmp1").write_text("not ours: kept")
    merge_shards(tmp_path, progress=False)
    assert sorted(p.name for p in (tmp_path / "train").glob(".*")) == [".mine.tmp1"]
    assert not (tmp_path / "train" / "index.json.tmp").exists()


def test_documents_are_never_cut_by_a_tokenizer_s_own_truncation(tok):
    """tokenizer.json may carry the model's truncation (all-MiniLM-L6-v2's: 128 tokens), which the
    Rust tokenizer applies when called directly: sharding with it kept the first 128 tokens of every
    document, silently. The encoder uses a copy without it and leaves the caller's as it was."""
    from transformers import AutoTokenizer

    from ds_train.data.piece_tokenizer import BatchEncoder

    truncating = AutoTokenizer.from_pretrained(str(TOKENIZER))
    truncating.backend_tokenizer.enable_truncation(16)
    text = " ".join(f"word{i} and more" for i in range(200))
    want = tok(text, add_special_tokens=False)["input_ids"]
    assert len(want) > 100
    assert [list(x) for x in BatchEncoder(truncating)([text, "a b"])] == [
        want,
        tok("a b", add_special_tokens=False)["input_ids"],
    ]
    assert truncating.backend_tokenizer.truncation["max_length"] == 16


def test_a_long_document_is_tokenized_in_chunks_to_the_same_ids(tok, corpus):
    """A document over BatchEncoder.chunk_chars (1 MiB) is encoded a chunk at a time, cut before a
    space between two words: one 27 MB document peaked at 3.4 GB in a worker (data audit). The ids
    are the whole document's."""
    from ds_train.data.piece_tokenizer import BatchEncoder, text_chunks

    big = "\n\n".join(json.loads(line)["text"] for line in corpus.read_text().splitlines())
    assert len(big) > 50_000
    whole = BatchEncoder(tok)([big, "short"])
    for size in (777, 3000):
        assert "".join(text_chunks(big, size)) == big and max(map(len, text_chunks(big, size))) <= size
        chunked = BatchEncoder(tok, chunk_chars=size)([big, "short"])
        assert [list(x) for x in chunked] == [list(x) for x in whole]


def _bos_tokenizer(tok):
    """The test tokenizer with a Llama-style BOS `<s>` put before every text it encodes."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_str(tok.backend_tokenizer.to_str())
    backend.add_special_tokens(["<s>"])
    bos = backend.token_to_id("<s>")
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token=tok.eos_token, pad_token=tok.pad_token
    )


def test_documents_start_with_bos_where_the_tokenizer_adds_one(tmp_path, corpus, tok):
    """A Llama-style tokenizer feeds the model a BOS before every prompt: shards made with it start
    every document with that BOS (--bos auto), so training sees what inference gives."""
    from ds_train.data.document_framing import document_start

    llama_like = _bos_tokenizer(tok)
    bos = llama_like.bos_token_id
    assert llama_like("a b")["input_ids"][0] == bos
    assert document_start(llama_like) == bos
    assert document_start(llama_like, "never") is None
    assert document_start(tok) is None  # GPT-2 style: its BOS is the separator; nothing added
    assert document_start(tok, "always") == tok.bos_token_id

    out = tmp_path / "bos"
    manifest = shard_corpus([str(corpus)], out, llama_like, _opts(valid_fraction=0.0))["train"]
    assert manifest["bos_token_id"] == bos
    rows, starts = _rows_with_webdataset(out / "train")
    stream = np.concatenate([rows[0], rows[1:, 1:].ravel()])
    flat_starts = [i * SEQ + c for i, s in enumerate(starts) for c in s]
    assert len(flat_starts) == manifest["total_documents"] == 600
    assert (stream[flat_starts] == bos).all()  # each document starts at its BOS...
    assert (stream == bos).sum() == 600  # ...and nowhere else holds one
    # ...right after the previous document's EOS
    assert (stream[np.array(flat_starts[1:]) - 1] == tok.eos_token_id).all()
    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    first_doc = stream[flat_starts[0] + 1 : flat_starts[1] - 1]
    assert llama_like.decode(first_doc.tolist()) == texts[0]

    plain = shard_corpus(
        [str(corpus)], tmp_path / "never", llama_like, _opts(valid_fraction=0.0, bos="never")
    )
    assert plain["train"]["bos_token_id"] is None
    plain_rows, _ = _rows_with_webdataset(tmp_path / "never" / "train")
    assert not (plain_rows == bos).any() and plain["train"]["total_documents"] == 600


def test_training_on_shards_without_the_tokenizer_s_bos_is_warned(tmp_path, corpus, tok, caplog):
    from ds_train.cli import main
    from tests.helpers import base_config, write_config

    llama_like = _bos_tokenizer(tok)
    llama_like.save_pretrained(tmp_path / "tok")
    for bos in ("never", "auto"):
        shard_corpus([str(corpus)], tmp_path / bos, llama_like, _opts(valid_fraction=0.0, bos=bos))
        cfg = base_config(tmp_path / f"run-{bos}", tmp_path / bos)
        cfg["model"]["tokenizer"] = str(tmp_path / "tok")
        caplog.clear()
        assert main(["pretrain", str(write_config(tmp_path / f"{bos}.yaml", cfg)), "--check"]) == 0
        warned = f"documents start without the BOS token (id {llama_like.bos_token_id})" in caplog.text
        assert warned == (bos == "never"), caplog.text


def test_work_begun_before_bos_existed_says_how_to_continue(tmp_path, corpus, tok):
    llama_like = _bos_tokenizer(tok)
    plan = prepare_plan([str(corpus)], tmp_path, llama_like, _opts(bos="never"))
    assert "bos" not in plan  # as every plan before --bos: its id unchanged
    with pytest.raises(CorpusError, match="begun before --bos existed.*continue it with --bos never"):
        prepare_plan([str(corpus)], tmp_path, llama_like, _opts())
    assert prepare_plan([str(corpus)], tmp_path, llama_like, _opts(bos="never"))["id"] == plan["id"]
