"""Shard-set sources: http (with a flaky server), pipe:, fsspec URLs, brace patterns, weighted mixes."""

from __future__ import annotations

import threading
from collections import Counter
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from ds_train.data import remote
from ds_train.data.loader import MicroBatches, build_plan, load_shard_sets
from ds_train.data.reader import RowReader
from ds_train.data.shard_set import DataError, load_shard_set, parse_sources
from ds_train.distributed.deepspeed_config import BatchLayout
from ds_train.objectives.causal_lm import CausalLM


def epoch_rows(spec: str, cache_dir: Path | None) -> np.ndarray:
    """Every row of the shard set at `spec`, in the order a fixed-seed plan visits them."""
    plan = build_plan(spec, seed=1, shuffle=True, window=2)
    source, shard, row = plan.locate(np.arange(plan.epoch_size))
    rows, lost = RowReader(plan.sources, cache_dir).read(source, shard, row)
    assert not lost.any()
    return rows


@pytest.fixture(scope="module")
def local_rows(shards) -> np.ndarray:
    return epoch_rows(str(shards / "train"), None)


class _Handler(SimpleHTTPRequestHandler):
    """Serves a directory; with `failures` set, answers 503 to the first N requests of each path."""

    failures = 0
    counts: Counter

    def do_GET(self):
        self.counts[self.path] += 1
        if self.counts[self.path] <= self.failures:
            self.send_error(503, "flaky on purpose")
            return
        super().do_GET()

    def log_message(self, *args) -> None:
        pass


def serve(directory: Path, failures: int = 0):
    handler = type("H", (_Handler,), {"failures": failures, "counts": Counter()})
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(handler, directory=str(directory)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, handler.counts, f"http://127.0.0.1:{server.server_address[1]}"


@pytest.fixture
def fast_retries(monkeypatch):
    monkeypatch.setattr(remote, "BACKOFF_S", 0.01)


def test_http_source_reads_the_same_rows(shards, tmp_path, local_rows):
    server, counts, url = serve(shards)
    try:
        rows = epoch_rows(f"{url}/train", tmp_path / "cache")
        np.testing.assert_array_equal(rows, local_rows)
        # each shard was downloaded once, then read from the verified local copy
        assert all(n == 1 for n in counts.values())
        assert len(list((tmp_path / "cache").rglob("train-*.tar"))) == len(
            load_shard_set(f"{url}/train").names
        )
    finally:
        server.shutdown()
        server.server_close()


def test_flaky_http_server_is_retried_with_backoff(shards, tmp_path, local_rows, fast_retries, caplog):
    server, counts, url = serve(shards, failures=2)
    try:
        with caplog.at_level("WARNING"):
            rows = epoch_rows(f"{url}/train", tmp_path / "cache")
        np.testing.assert_array_equal(rows, local_rows)
        assert counts["/train/index.json"] == 3 and counts["/train/train-000000.tar"] == 3
        assert "retry 2/4" in caplog.text and "503" in caplog.text
    finally:
        server.shutdown()
        server.server_close()


def test_http_source_that_keeps_failing_gives_up_with_the_uri(shards, tmp_path, fast_retries):
    server, _, url = serve(shards, failures=100)
    try:
        with pytest.raises(DataError, match=r"index.json.*failed after 5 attempts"):
            load_shard_set(f"{url}/train")
    finally:
        server.shutdown()
        server.server_close()
    server, counts, url = serve(shards)
    try:  # a missing object is not retried
        with pytest.raises(DataError, match="no shard manifest"):
            load_shard_set(f"{url}/nowhere")
        assert counts["/nowhere/index.json"] == 1
    finally:
        server.shutdown()
        server.server_close()


def test_remote_shard_that_changed_fails_its_checksum(shards, tmp_path, fast_retries):
    served = tmp_path / "served"
    import shutil

    shutil.copytree(shards / "train", served / "train")
    plan = build_plan(str(served / "train"), seed=1, shuffle=False, window=1)
    victim = served / "train" / plan.sources[0].names[0]
    data = bytearray(victim.read_bytes())
    data[-20000] ^= 0xFF
    victim.write_bytes(bytes(data))
    server, _, url = serve(served)
    try:
        remote_plan = build_plan(f"{url}/train", seed=1, shuffle=False, window=1)
        with pytest.raises(DataError, match=r"train-000000.tar.*checksum mismatch"):
            RowReader(remote_plan.sources, tmp_path / "cache").read(
                np.zeros(1, np.int64), np.zeros(1, np.int64), np.zeros(1, np.int64)
            )
        assert not list((tmp_path / "cache").rglob("train-000000.tar"))  # nothing half-written kept
    finally:
        server.shutdown()
        server.server_close()


def test_a_missing_remote_shard_says_not_found(shards, tmp_path):
    served = tmp_path / "served"
    import shutil

    shutil.copytree(shards / "train", served / "train")
    plan = build_plan(str(served / "train"), seed=1, shuffle=False, window=1)
    (served / "train" / plan.sources[0].names[0]).unlink()
    server, _, url = serve(served)
    try:
        remote_plan = build_plan(f"{url}/train", seed=1, shuffle=False, window=1)
        uri = f"{url}/train/{plan.sources[0].names[0]}"
        with pytest.raises(
            DataError, match=rf"^shard {uri}: not found \(HTTP 404\) \(listed in the manifest"
        ):
            RowReader(remote_plan.sources, tmp_path / "cache").read(
                np.zeros(1, np.int64), np.zeros(1, np.int64), np.zeros(1, np.int64)
            )
    finally:
        server.shutdown()
        server.server_close()


def test_pipe_source(shards, tmp_path, local_rows, fast_retries):
    rows = epoch_rows(f"pipe:cat {shards}/train/{{shard}}", tmp_path / "cache")
    np.testing.assert_array_equal(rows, local_rows)
    with pytest.raises(DataError, match="must contain"):
        load_shard_set("pipe:cat something")
    with pytest.raises(DataError, match="exited 1"):
        load_shard_set(f"pipe:cat {tmp_path}/absent/{{shard}}")


def test_fsspec_url_source(shards, tmp_path, local_rows):
    """Any fsspec URL works (s3:// the same way, with s3fs installed); memory:// needs no server."""
    import fsspec

    fs = fsspec.filesystem("memory")
    for path in (shards / "train").iterdir():
        fs.pipe(f"/corpus/train/{path.name}", path.read_bytes())
    try:
        np.testing.assert_array_equal(epoch_rows("memory://corpus/train", tmp_path / "cache"), local_rows)
    finally:
        fs.rm("/corpus", recursive=True)


def test_s3_without_s3fs_says_what_to_install():
    import importlib.util

    if importlib.util.find_spec("s3fs") is not None:
        pytest.skip("s3fs is installed here")
    with pytest.raises(DataError, match="s3fs") as e:
        load_shard_set("s3://some-bucket/corpus/train")
    assert "attempts" not in str(e.value)  # a missing package is not retried


def test_brace_pattern_selects_shards(shards):
    full = load_shard_set(str(shards / "train"))
    sub = load_shard_set(str(shards / "train" / "train-{000001..000002}.tar"))
    assert sub.names == full.names[1:3]
    np.testing.assert_array_equal(sub.rows, full.rows[1:3])
    with pytest.raises(DataError, match="missing from the manifest"):
        load_shard_set(str(shards / "train" / "train-{000001..000099}.tar"))
    with pytest.raises(DataError, match="no shard manifest"):
        load_shard_set(str(shards / "nothing"))


def test_weighted_mixture_of_two_shard_sets(shards):
    spec = [{"path": str(shards / "train"), "weight": 3}, {"path": str(shards / "valid"), "weight": 1}]
    assert parse_sources(spec) == [(str(shards / "train"), 3.0), (str(shards / "valid"), 1.0)]
    plan = build_plan(spec, seed=2, shuffle=True, window=2, shard_sets=load_shard_sets(spec))
    lay = BatchLayout(40, 40, 1, 1)
    batch = MicroBatches(plan, lay, 0, 0, CausalLM(0, 1), None)[0]
    counts = np.bincount(batch["source"].numpy(), minlength=2)
    assert counts.tolist() == [30, 10]
    # the valid rows are really valid rows (read from the second set)
    rows, _ = RowReader(plan.sources, None).read(
        batch["source"].numpy(), batch["shard"].numpy(), batch["row"].numpy()
    )
    np.testing.assert_array_equal(batch["input_ids"].numpy(), rows[:, :-1])
    for bad in ([{"path": "x", "weight": 0}], [{"path": "x", "wieght": 1}], 42):
        with pytest.raises(DataError):
            parse_sources(bad)


def test_a_damaged_manifest_is_one_named_error(shards, tmp_path):
    """A manifest with a field missing, of the wrong type, or not UTF-8 (hand-edited, or damaged
    on disk) used to raise KeyError / TypeError / UnicodeDecodeError from deep in the loader."""
    import json
    import shutil

    copy = tmp_path / "train"
    shutil.copytree(shards / "train", copy)
    manifest = json.loads((copy / "index.json").read_text())
    for damaged in (
        {k: v for k, v in manifest.items() if k != "dtype"},
        {**manifest, "dtype": "u5nt16"},
        {**manifest, "shards": [{"rows": 3}]},
    ):
        (copy / "index.json").write_text(json.dumps(damaged))
        with pytest.raises(DataError, match=r"index.json: not a shard manifest ds-train can read"):
            load_shard_set(str(copy))
    (copy / "index.json").write_bytes(json.dumps(manifest).encode().replace(b'"seq_len"', b'"seq\xff_len"'))
    with pytest.raises(DataError, match=r"index.json: not UTF-8 text"):
        load_shard_set(str(copy))
