"""slurm/shard_array.sbatch on the local two-node Slurm cluster: an array of tokenizing tasks and
the merge job its first task submits write exactly the shards and manifests of one
single-process `ds-train shard` with the same arguments."""

from __future__ import annotations

import hashlib
import re
import time
from datetime import datetime
from pathlib import Path

import pytest

from tests.helpers import REPO, TOKENIZER

pytestmark = [pytest.mark.system, pytest.mark.slow]

SCRIPT = REPO / "slurm" / "shard_array.sbatch"
TIMEOUT = 300
TASKS = 3


def _digest(out: Path) -> dict[str, str]:
    return {
        str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(out.rglob("*"))
        if p.is_file()
    }


def _array_states(cluster, job: str) -> dict[str, str]:
    """ArrayTaskId → JobState for every task of array job `job`."""
    out = cluster.scontrol("show", "job", "-o", job, check=False).stdout
    states = {}
    for line in out.splitlines():
        fields = dict(re.findall(r"(\w+)=(\S*)", line))
        if "ArrayTaskId" in fields:
            states[fields["ArrayTaskId"]] = fields["JobState"]
    return states


def _wait_for_text(path: Path, pattern: str, timeout: float, cluster, job: str) -> re.Match:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = re.search(pattern, path.read_text()) if path.is_file() else None
        if m:
            return m
        cluster._check_daemons()
        time.sleep(0.5)
    raise AssertionError(
        f"no {pattern!r} in {path} after {timeout}s; array tasks: {_array_states(cluster, job)}\n"
        + (path.read_text() if path.is_file() else "(no file)")
    )


def test_shard_array_job_matches_a_single_process_run(slurm_cluster, slurm_env, corpus, tmp_path):
    from ds_train.cli import main

    options = ["--tokenizer", str(TOKENIZER), "--seq-len", "32", "--valid-fraction", "0.1"]
    # small shards, members and pieces, so every task gets several pieces and the merge several shards
    options += ["--rows-per-shard", "150", "--member-size", "2000", "--piece-size", "6000", "--no-progress"]
    single = tmp_path / "single"
    assert main(["shard", str(corpus), "--output", str(single), *options]) == 0
    expected = _digest(single)
    assert {"train/index.json", "valid/index.json", "train/train-000001.tar"} <= set(expected)

    # ids 1..3, not 0..2: the task index is the position in the array
    out = tmp_path / "array"
    job = slurm_cluster.sbatch(
        [f"--array=1-{TASKS}", SCRIPT, corpus, "--output", out, *options], env=slurm_env(), cwd=tmp_path
    )
    first_log = tmp_path / f"slurm-ds-shard-{job}_1.out"
    merge = _wait_for_text(first_log, r"submitted the merge as job (\d+)", TIMEOUT, slurm_cluster, job).group(
        1
    )
    info = slurm_cluster.wait_finished(merge, TIMEOUT)
    states = _array_states(slurm_cluster, job)
    logs = {i: (tmp_path / f"slurm-ds-shard-{job}_{i}.out").read_text() for i in range(1, TASKS + 1)}
    assert info["JobState"] == "COMPLETED", (info, states, logs, slurm_cluster.logs())
    assert states == {str(i): "COMPLETED" for i in range(1, TASKS + 1)}, states
    # the merge waited for the whole array, and each task tokenized its own share
    assert info["Dependency"] in ("(null)", ""), info  # satisfied
    ended = [datetime.fromisoformat(slurm_cluster.job(f"{job}_{i}")["EndTime"]) for i in range(1, TASKS + 1)]
    assert datetime.fromisoformat(info["StartTime"]) >= max(ended)
    pieces = []
    for i, text in logs.items():
        m = re.search(rf"task {i - 1}/{TASKS}: tokenized (\d+) pieces", text)
        assert m, (i, text)
        pieces.append(int(m.group(1)))
    assert min(pieces) > 0, pieces

    assert _digest(out) == expected
    merge_log = (tmp_path / f"slurm-ds-shard-merge-{merge}.out").read_text()
    assert re.search(r"^train: \d+ shards", merge_log, re.M), merge_log
