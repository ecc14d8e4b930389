"""`ds-train data order|show|verify` (in-process: the CLI entry point with argv)."""

from __future__ import annotations

import json
import shutil

import pytest

from ds_train.cli import main
from ds_train.data.loader import MicroBatches, build_plan
from ds_train.distributed.deepspeed_config import BatchLayout
from ds_train.objectives.causal_lm import CausalLM
from tests.helpers import base_config, write_config


@pytest.fixture
def config(tmp_path, shards):
    cfg = base_config(tmp_path / "run", shards)
    cfg["train"].update(global_batch_size=8, micro_batch_size=1)
    return write_config(tmp_path / "run.yaml", cfg)


def run(capsys, *argv) -> str:
    code = main(list(map(str, argv)))
    out = capsys.readouterr().out
    assert code == 0, out
    return out


def test_order_does_not_depend_on_world_size(config, capsys):
    outputs = {w: run(capsys, "data", "order", config, "--steps", 5, "--world-size", w) for w in (1, 2, 4, 8)}
    assert len(set(outputs.values())) == 1
    lines = outputs[1].splitlines()
    assert len(lines) == 5 and lines[0].startswith("step 1: train-")  # numbered as the training log
    assert len(lines[0].split()) == 2 + 8  # "step", "1:", then the 8 samples of the global batch


def test_order_is_what_the_loader_feeds_the_ranks(config, shards, capsys):
    out = run(capsys, "data", "order", config, "--steps", 3, "--start-step", 2, "--json", "--world-size", 2)
    steps = [json.loads(line) for line in out.splitlines()]
    # the trainer's loader on each of 2 ranks (micro-batch 1, 4 accumulation steps)
    plan = build_plan(str(shards / "train"), seed=7, shuffle=True, window=16)
    lay = BatchLayout(8, 1, 4, 2)
    for s in steps:
        got = []
        for rank in (0, 1):
            ds = MicroBatches(
                plan, lay, rank, s["step"] - 1, CausalLM(0, 1), None
            )  # the loader counts from 0
            for k in range(lay.grad_accum):
                b = ds[k]
                got += [(plan.sources[0].names[i], r) for i, r in zip(b["shard"].tolist(), b["row"].tolist())]
        assert [(x["shard"], x["row"]) for x in s["samples"]] == got
    assert [s["step"] for s in steps] == [2, 3, 4]


def test_order_follows_overrides(config, capsys):
    a = run(capsys, "data", "order", config, "--steps", 2)
    b = run(capsys, "data", "order", config, "run.seed=8", "--steps", 2)
    c = run(capsys, "data", "order", config, "data.shuffle=false", "--steps", 1)
    assert a != b
    # data.seed fixes the order whatever run.seed (pretraining audit: one seed drove everything)
    d = run(capsys, "data", "order", config, "run.seed=8", "data.seed=3", "--steps", 2)
    e = run(capsys, "data", "order", config, "run.seed=9", "data.seed=3", "--steps", 2)
    f = run(capsys, "data", "order", config, "run.seed=3", "--steps", 2)
    assert d == e == f and d != b
    rows = [int(x.rsplit(":", 1)[1]) for x in c.split()[2:]]
    assert rows == list(range(8))  # unshuffled: the first rows of the first shard


def test_order_refuses_a_world_size_that_does_not_divide_the_batch(config, capsys):
    assert main(["data", "order", str(config), "--world-size", "3"]) == 2
    assert "global_batch_size" in capsys.readouterr().err
    assert main(["data", "show", str(config), "--step", "0"]) == 2
    assert "steps count from 1, as the training log does" in capsys.readouterr().err


def test_show_decodes_the_samples_of_a_step(config, shards, capsys):
    from transformers import AutoTokenizer

    from tests.helpers import TOKENIZER

    out = run(capsys, "data", "show", config, "--step", 2, "--max-chars", 0)
    blocks = out.split("--- step 2 sample ")[1:]
    assert len(blocks) == 8
    plan = build_plan(str(shards / "train"), seed=7, shuffle=True, window=16)
    # the step logged as 2 is the loader's step 1 (the trainer logs a step once it is taken)
    b = MicroBatches(plan, BatchLayout(8, 8, 1, 1), 0, 1, CausalLM(0, 1), None)[0]
    tok = AutoTokenizer.from_pretrained(str(TOKENIZER))
    for block, ids in zip(blocks, b["input_ids"].tolist()):
        header, text = block.split("\n", 1)
        assert "/train-0000" in header and " row " in header
        assert text == tok.decode(ids) + "\n"


def test_verify_finds_corrupt_and_missing_shards(shards, tmp_path, capsys):
    out = tmp_path / "train"
    shutil.copytree(shards / "train", out)
    names = sorted(p.name for p in out.glob("*.tar"))
    good = run(capsys, "data", "verify", out)
    assert f"{len(names)}/{len(names)} shards ok" in good
    data = bytearray((out / names[0]).read_bytes())
    data[len(data) // 2] ^= 1  # one flipped bit in the rows: only the checksum sees it
    (out / names[0]).write_bytes(bytes(data))
    (out / names[1]).unlink()
    assert main(["data", "verify", str(out)]) == 1
    report = capsys.readouterr().out
    assert f"BAD {names[0]}: sha256" in report and f"BAD {names[1]}: missing" in report
    assert main(["data", "verify", str(out), "--no-checksums"]) == 1
    assert f"BAD {names[0]}" not in capsys.readouterr().out


def test_order_of_a_weighted_mixture_names_the_source(tmp_path, shards, capsys):
    cfg = base_config(tmp_path / "run", shards)
    cfg["data"]["train"] = [
        {"path": str(shards / "train"), "weight": 3},
        {"path": str(shards / "valid"), "weight": 1},
    ]
    path = write_config(tmp_path / "mix.yaml", cfg)
    out = run(capsys, "data", "order", path, "--steps", 5)
    ids = [x for line in out.splitlines() for x in line.split()[2:]]
    sources = [x.split(":")[0] for x in ids]
    assert len(ids) == 40 and sources.count("1") == 10 and sources.count("0") == 30
    assert all(x.split(":")[1].startswith("valid-") for x in ids if x.startswith("1:"))


def test_shard_meeting_bad_input_leaves_no_output_behind(tmp_path, capsys):
    from tests.helpers import TOKENIZER

    (tmp_path / "c.jsonl").write_text('{"body": "a document under another field"}\n')
    out = tmp_path / "out"
    argv = ["shard", tmp_path / "c.jsonl", "--output", out, "--tokenizer", TOKENIZER, "--seq-len", "32"]
    assert main([*map(str, argv), "--no-progress"]) == 2
    assert "no 'text' field (found ['body']); pass --text-field" in capsys.readouterr().err
    assert not out.exists()  # a re-run with --text-field body is not refused for an existing output
    out.mkdir()
    (out / "mine.txt").write_text("kept")  # an output directory that was there before is left alone
    assert main([*map(str, argv), "--no-progress"]) == 2
    assert (out / "mine.txt").read_text() == "kept"
