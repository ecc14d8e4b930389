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
