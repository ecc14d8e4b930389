"""Loader guarantees: exactly once per epoch, equal steps, exact and elastic resume, seek not replay,
corrupt shards named (or skipped and counted)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from ds_train.data.loader import MicroBatches, build_plan, global_batch_positions, make_loader, rank_positions
from ds_train.data.reader import RowReader
from ds_train.data.shard_set import DataError
from ds_train.distributed.deepspeed_config import BatchLayout
from ds_train.objectives.base import IGNORE_INDEX
from ds_train.objectives.causal_lm import CausalLM
from tests.helpers import REPO, clean_env

OBJ = CausalLM(eos_id=0, pad_id=1)


def layout(world: int, global_batch: int = 8, micro: int = 2) -> BatchLayout:
    return BatchLayout(global_batch, micro, global_batch // (micro * world), world)


def plan_of(shards: Path, split: str = "train", seed: int = 3, window: int = 2):
    return build_plan(str(shards / split), seed=seed, shuffle=True, window=window)


def rank_batches(plan, lay, rank, start_step, steps, workers=0, **kw):
    """This rank's micro-batches for `steps` optimizer steps, through the real DataLoader."""
    ds = MicroBatches(plan, lay, rank, start_step, OBJ, None, **kw)
    loader = make_loader(ds, num_workers=workers, prefetch_factor=2, num_micro_batches=steps * lay.grad_accum)
    return list(loader)


def global_ids(per_rank: list[list[dict]], lay: BatchLayout) -> list[list[int]]:
    """Per global step, the global positions of its samples in rank order."""
    steps = len(per_rank[0]) // lay.grad_accum
    out = []
    for s in range(steps):
        ids = []
        for batches in per_rank:
            for b in batches[s * lay.grad_accum : (s + 1) * lay.grad_accum]:
                assert int(b["step"]) == int(batches[s * lay.grad_accum]["step"])
                ids += b["sample_ids"].tolist()
        out.append(ids)
    return out


def test_exactly_once_per_epoch_across_2_ranks_x_2_workers(shards):
    plan = plan_of(shards)
    n = plan.epoch_size
    lay = layout(2)
    steps = -(-n // lay.global_batch_size) + 1  # one full epoch and into the next
    per_rank = [rank_batches(plan, lay, r, 0, steps, workers=2) for r in (0, 1)]
    assert len(per_rank[0]) == len(per_rank[1]) == steps * lay.grad_accum  # no rank runs dry
    seen = []
    for batches in per_rank:
        for b in batches:
            for pos, s, r in zip(b["sample_ids"].tolist(), b["shard"].tolist(), b["row"].tolist()):
                seen.append((pos, s, r))
    positions = sorted(p for p, _, _ in seen)
    assert positions == list(range(steps * lay.global_batch_size))  # no duplicate, no gap
    first_epoch = {(s, r) for p, s, r in seen if p < n}
    assert len(first_epoch) == n == int(plan.sources[0].rows.sum())  # every row exactly once
    # the tokens are those rows' tokens
    b = per_rank[1][3]
    rows, _ = RowReader(plan.sources, None).read(np.zeros(2, np.int64), b["shard"].numpy(), b["row"].numpy())
    np.testing.assert_array_equal(b["input_ids"].numpy(), rows[:, :-1])


def test_equal_step_counts_with_uneven_shards(shards):
    plan = plan_of(shards)
    rows = plan.sources[0].rows
    assert len(set(rows.tolist())) > 1  # the fixture's last shard is short
    lay = BatchLayout(6, 1, 3, 2)  # 2 ranks × 3 accumulation steps × 1
    steps = plan.epoch_size // 6 + 3  # the epoch does not divide into global batches
    counts = [sum(1 for _ in rank_batches(plan, lay, r, 0, steps)) for r in (0, 1)]
    assert counts == [steps * 3, steps * 3]
    # the endless training loader keeps going past the epoch on every rank alike
    for r in (0, 1):
        it = iter(make_loader(MicroBatches(plan, lay, r, steps, OBJ, None), num_workers=0, prefetch_factor=2))
        assert int(next(it)["step"]) == steps


def test_global_batches_do_not_depend_on_world_size_and_resume_elastically(shards):
    plan = plan_of(shards)
    one = global_ids([rank_batches(plan, layout(1), 0, 0, 6)], layout(1))
    assert one == [global_batch_positions(s, layout(1)).tolist() for s in range(6)]
    # 2 ranks for 3 steps, then "resume" on 1 rank for 3 more: the same global batches
    two_then_one = global_ids([rank_batches(plan, layout(2), r, 0, 3) for r in (0, 1)], layout(2))
    two_then_one += global_ids([rank_batches(plan, layout(1), 0, 3, 3)], layout(1))
    assert two_then_one == one
    one_then_two = global_ids([rank_batches(plan, layout(1), 0, 0, 2)], layout(1))
    one_then_two += global_ids([rank_batches(plan, layout(2), r, 2, 4) for r in (0, 1)], layout(2))
    assert one_then_two == one
    # and the samples behind those ids are the same rows
    b1 = rank_batches(plan, layout(1), 0, 4, 1)
    b2 = rank_batches(plan, layout(2), 1, 4, 1)
    np.testing.assert_array_equal(b1[-1]["input_ids"].numpy(), b2[-1]["input_ids"].numpy())


KILLED_RUN = textwrap.dedent(
    """
    import json, sys
    from ds_train.data.loader import MicroBatches, build_plan, make_loader
    from ds_train.distributed.deepspeed_config import BatchLayout
    from ds_train.objectives.causal_lm import CausalLM
    plan = build_plan(sys.argv[1], seed=3, shuffle=True, window=2)
    ds = MicroBatches(plan, BatchLayout(8, 2, 2, 2), 1, 0, CausalLM(0, 1), None)
    for b in make_loader(ds, num_workers=2, prefetch_factor=2):
        print(json.dumps([int(b["step"]), b["sample_ids"].tolist(), b["input_ids"].sum().item()]), flush=True)
    """
)


def test_kill_and_resume_equals_uninterrupted(shards):
    """A loader process killed mid-run (SIGKILL, workers and all) resumes from its last full step."""
    lay = layout(2)
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_RUN, str(shards / "train")],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env=clean_env(),
        start_new_session=True,
    )
    lines = []
    for line in proc.stdout:
        lines.append(json.loads(line))
        if len(lines) == 9:  # mid-step: micro-batch 0 of step 4 arrived, step 4 is incomplete
            break
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = [x for x in lines if x[0] < lines[-1][0]]  # completed steps only
    resume_step = done[-1][0] + 1
    plan = plan_of(shards)
    resumed = [
        [int(b["step"]), b["sample_ids"].tolist(), b["input_ids"].sum().item()]
        for b in rank_batches(plan, lay, 1, resume_step, 3, workers=2)
    ]
    uninterrupted = [
        [int(b["step"]), b["sample_ids"].tolist(), b["input_ids"].sum().item()]
        for b in rank_batches(plan, lay, 1, 0, resume_step + 3)
    ]
    assert done + resumed == uninterrupted


def test_resume_at_90_percent_is_a_seek(shards, monkeypatch):
    """Starting late in the epoch opens only the shards and shuffle windows that batch needs."""
    from ds_train.data import order as order_mod

    plan = plan_of(shards, window=1)
    lay = layout(1)
    late = int(0.9 * plan.epoch_size) // lay.global_batch_size
    calls = {"windows": 0, "shards": 0}
    real_window = order_mod.SampleOrder._window_perm
    real_open = RowReader._open_shard

    def count_window(self, *a):
        calls["windows"] += 1
        return real_window(self, *a)

    def count_open(self, *a):
        calls["shards"] += 1
        return real_open(self, *a)

    monkeypatch.setattr(order_mod.SampleOrder, "_window_perm", count_window)
    monkeypatch.setattr(RowReader, "_open_shard", count_open)
    costs = {}
    for start in (0, late):
        calls.update(windows=0, shards=0)
        fresh = plan_of(shards, window=1)  # nothing cached from the previous start
        batch = MicroBatches(fresh, lay, 0, start, OBJ, None)[0]
        assert int(batch["step"]) == start
        costs[start] = dict(calls)
    # work for the first batch is bounded by the batch, not by the position in the epoch
    assert costs[late]["shards"] <= lay.micro_batch_size and costs[late]["windows"] <= lay.micro_batch_size
    assert costs[late]["shards"] <= costs[0]["shards"] + 1


@pytest.fixture(scope="module")
def small_members(tmp_path_factory, corpus) -> Path:
    """The corpus in shards of 300 rows stored as tar members of ~30 rows each."""
    from transformers import AutoTokenizer

    from ds_train.data.sharding import ShardOptions, shard_corpus
    from tests.helpers import TOKENIZER

    out = tmp_path_factory.mktemp("members")
    opts = ShardOptions(seq_len=32, rows_per_shard=300, member_bytes=2000, progress=False)
    shard_corpus([str(corpus)], out, AutoTokenizer.from_pretrained(str(TOKENIZER)), opts)
    return out / "train"


@pytest.fixture
def broken_shards(small_members, tmp_path) -> Path:
    """A copy of a shard set whose shard 1 is cut inside its second member's rows."""
    out = tmp_path / "train"
    shutil.copytree(small_members, out)
    from ds_train.data.shard_format import read_members

    manifest = json.loads((out / "index.json").read_text())
    path = out / manifest["shards"][1]["name"]
    members = read_members(path, manifest["seq_len"], np.dtype(manifest["dtype"]))
    with open(path, "r+b") as fh:
        fh.truncate(members[1].data_offset + 10)
    return out


def _all_rows_of(plan, shard_index):
    rows = int(plan.sources[0].rows[shard_index])
    return np.zeros(rows, np.int64), np.full(rows, shard_index), np.arange(rows)


def test_truncated_shard_error_names_shard_and_offset(broken_shards):
    plan = build_plan(str(broken_shards), seed=3, shuffle=False, window=1)
    name = plan.sources[0].names[1]
    with pytest.raises(DataError, match=rf"{name}: member .* at byte \d+ runs past the end .* truncated"):
        RowReader(plan.sources, None).read(*_all_rows_of(plan, 1))
    # a file cut exactly between members: fewer rows than the manifest says, and where it ends
    path = broken_shards / name
    with open(path, "r+b") as fh:
        fh.truncate(2048)
    with pytest.raises(DataError, match=rf"{name}.*(manifest says|byte \d+)"):
        RowReader(plan.sources, None).read(*_all_rows_of(plan, 1))
    path.write_bytes(b"garbage" * 100)
    with pytest.raises(DataError, match=rf"{name}.*byte \d+"):
        RowReader(plan.sources, None).read(*_all_rows_of(plan, 1))


def test_a_damaged_array_header_is_named_not_a_traceback(small_members, tmp_path):
    """numpy parses .npy headers with Python's tokenizer: one damaged byte there raised
    tokenize.TokenError, which escaped the reader (found by flipping random bytes of a shard)."""
    out = tmp_path / "train"
    shutil.copytree(small_members, out)
    plan = build_plan(str(out), seed=3, shuffle=False, window=1)
    path = out / plan.sources[0].names[1]
    data = path.read_bytes()
    header = data.index(b"{'descr'")
    path.write_bytes(data[:header] + data[header:].replace(b"}", b"(", 1))  # the dict left open
    with pytest.raises(DataError, match=rf"{path.name}: member .* at byte \d+ is not a valid .npy array"):
        RowReader(plan.sources, None).read(*_all_rows_of(plan, 1))
    _, lost = RowReader(plan.sources, None, skip_corrupt=True).read(*_all_rows_of(plan, 1))
    assert lost.all()  # its first member: nothing readable before it


def test_skip_corrupt_replaces_lost_rows_with_ignored_padding_and_counts_them(broken_shards):
    plan = build_plan(str(broken_shards), seed=3, shuffle=False, window=1)
    reader = RowReader(plan.sources, None, skip_corrupt=True)
    _, lost = reader.read(*_all_rows_of(plan, 1))
    assert 0 < lost.sum() < len(lost)  # the intact first member is still read
    assert not lost[0] and lost[-1]
    # in a training batch: counted, and no targets from the replacement rows
    lay = BatchLayout(int(plan.sources[0].rows[0]) + 16, 8, 1, 1)  # step 0 reaches into shard 1
    chunked = CausalLM(eos_id=0, pad_id=1, loss_chunk_tokens=64)  # its target indices must follow
    ds = MicroBatches(plan, lay, 0, 0, chunked, None, skip_corrupt=True)
    total = 0
    for k in range(lay.grad_accum):
        b = ds[k]
        total += int(b["skipped"])
        skipped_rows = (b["labels"] == IGNORE_INDEX).all(dim=1)
        assert int(skipped_rows.sum()) >= int(b["skipped"])
        assert b["num_targets"] == (b["labels"] != IGNORE_INDEX).sum() == len(b["target_index"])
    assert total == 0  # the first member of shard 1 is intact
    late = MicroBatches(plan, BatchLayout(8, 8, 1, 1), 0, 0, chunked, None, skip_corrupt=True)
    start = int(plan.sources[0].rows[0]) + int(lost.argmax())  # the first lost row of shard 1
    b = late.batch_at(np.arange(start, start + 8), 0)
    assert int(b["skipped"]) == 8 and torch.all(b["labels"] == IGNORE_INDEX)
    assert b["num_targets"] == 0 and len(b["target_index"]) == 0
    intact = min(3, int(lost.argmax()))  # ≥ 1: the first row is intact
    mixed = late.batch_at(np.arange(start - intact, start - intact + 8), 0)  # intact rows, then lost ones
    labels = mixed["labels"].reshape(-1)
    assert len(mixed["target_index"]) > 0 and torch.all(labels[mixed["target_index"]] != IGNORE_INDEX)
    assert len(mixed["target_index"]) == int(mixed["num_targets"])
    # without the opt-in the same batch stops with the shard's name
    with pytest.raises(DataError, match=plan.sources[0].names[1]):
        MicroBatches(plan, BatchLayout(8, 8, 1, 1), 0, 0, OBJ, None).batch_at(np.arange(start, start + 8), 0)


def test_missing_shard_is_named(shards, tmp_path):
    out = tmp_path / "train"
    shutil.copytree(shards / "train", out)
    plan = build_plan(str(out), seed=3, shuffle=False, window=1)
    (out / plan.sources[0].names[2]).unlink()
    with pytest.raises(DataError, match=rf"shard .*{plan.sources[0].names[2]} is missing"):
        RowReader(plan.sources, None).read(*_all_rows_of(plan, 2))
    _, lost = RowReader(plan.sources, None, skip_corrupt=True).read(*_all_rows_of(plan, 2))
    assert lost.all()


def test_plan_state_is_in_global_terms_and_fingerprints_the_data(shards, tmp_path):
    plan = plan_of(shards)
    state = plan.state(123)
    assert state["consumed_samples"] == 123 and state["seed"] == 3
    assert "world_size" not in state and "rank" not in state
    assert state["tokenizer_sha256"] == plan.sources[0].tokenizer["sha256"]
    # fewer shards → another fingerprint (resume is refused against it)
    sub = build_plan(str(shards / "train" / "train-{000000..000001}.tar"), seed=3, shuffle=True, window=2)
    assert len(sub.sources[0].names) == 2 and sub.fingerprint != plan.fingerprint
    assert plan_of(shards).fingerprint == plan.fingerprint


def test_rank_positions_partition_the_global_batch():
    lay = BatchLayout(12, 2, 3, 2)
    got = np.concatenate([rank_positions(5, m, lay, r) for r in range(2) for m in range(3)])
    np.testing.assert_array_equal(got, np.arange(60, 72))


@pytest.mark.parametrize("uneven", [False, True])
def test_random_access_rows_equal_stock_webdataset_rows(small_members, monkeypatch, uneven):
    """Every row the reader copies out of the memory map (a division finds the member when members
    hold equal row counts, a bisect when not) is the row stock webdataset decodes."""
    import webdataset as wds

    from ds_train.data import reader as reader_module
    from ds_train.data.shard_format import Member

    plan = build_plan(str(small_members), seed=3, shuffle=False, window=1)
    shard_set = plan.sources[0]
    row_bytes = (shard_set.seq_len + 1) * shard_set.dtype.itemsize
    if uneven:  # the same bytes described as members of other sizes: only the bisect path fits
        original = reader_module.read_members

        def split(*args) -> list[Member]:
            out = []
            for m in original(*args):
                cut = max(1, m.rows // 3)
                out.append(Member(m.data_offset, cut, m.first_row))
                if m.rows > cut:
                    out.append(Member(m.data_offset + cut * row_bytes, m.rows - cut, m.first_row + cut))
            return out

        monkeypatch.setattr(reader_module, "read_members", split)
    reader = RowReader(plan.sources, None)
    for i, name in enumerate(shard_set.names):
        stock = wds.WebDataset([str(small_members / name)], shardshuffle=False, empty_check=False).decode()
        expected = np.concatenate([s["tokens.npy"] for s in stock])
        got, lost = reader.read(*_all_rows_of(plan, i))
        assert bool(reader._open[(0, i)].rows_per_member) is not uneven
        assert not lost.any() and np.array_equal(got, expected), name


def test_evaluation_reads_every_validation_row_once(shards):
    """train.eval_steps × the global batch beyond the validation rows used to wrap into a second
    epoch, weighing some rows twice; evaluation now stops after one pass and the wrapped rows of
    its last step carry no targets."""
    from ds_train.data.loader import eval_steps_once

    plan = build_plan(str(shards / "valid"), seed=0, shuffle=False, window=1)
    rows = plan.epoch_size
    lay = BatchLayout(8, 4, 2, 1)
    steps = eval_steps_once(plan, lay, eval_steps=100)
    assert steps == -(-rows // 8) < 100 and rows % 8  # a partial last step, the case that wrapped
    ds = MicroBatches(plan, lay, 0, 0, CausalLM(eos_id=0, pad_id=1), None, limit=rows)
    seen = []
    for k in range(steps * lay.grad_accum):
        b = ds[k]
        has_targets = (b["labels"] != IGNORE_INDEX).any(dim=1)
        seen += [(int(s), int(r)) for s, r, t in zip(b["shard"], b["row"], has_targets) if t]
    assert len(seen) == len(set(seen)) == rows  # every row once, none twice
    assert eval_steps_once(plan, lay, eval_steps=1) == 1  # fewer steps than rows: as configured


def test_several_validation_sets_are_read_in_proportion_to_their_rows(shards):
    """data.valid: [big, small] mixed the sets equally, so a small set filled half of every
    evaluation, its rows read many times over (data audit). Listed without weights, validation
    sets are weighted by their rows: one pass reads every row of every set about once."""
    from ds_train.data.loader import build_plan

    spec = [str(shards / "train"), str(shards / "valid")]
    plan = build_plan(spec, seed=0, shuffle=False, window=1, evaluation=True)
    rows = [s.num_rows for s in plan.sources]
    assert plan.weights == [float(r) for r in rows] and rows[0] > 5 * rows[1]
    source, _, row = plan.locate(np.arange(plan.epoch_size))
    per_source = np.bincount(source, minlength=2)
    assert abs(per_source[1] - rows[1]) <= 2, (per_source, rows)
    assert len(set(row[source == 1].tolist())) >= rows[1] - 2  # each valid row about once
    training = build_plan(spec, seed=0, shuffle=False, window=1)  # training mixes as weighted: equally
    assert training.weights == [1.0, 1.0]
    explicit = [{"path": spec[0], "weight": 1}, {"path": spec[1], "weight": 1}]
    assert build_plan(explicit, seed=0, shuffle=False, window=1, evaluation=True).weights == [1.0, 1.0]
