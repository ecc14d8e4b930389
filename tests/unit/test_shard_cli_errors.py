"""`ds-train shard` / `ds-train tokenizer train`: bad arguments and inputs end as one line, exit 2."""

from __future__ import annotations

import json

import pytest

from ds_train.cli import main
from tests.helpers import TOKENIZER


@pytest.fixture
def docs(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(f'{{"text": "document number {i}"}}\n' for i in range(50)))
    return path


def shard(tmp_path, *argv) -> list[str]:
    out = tmp_path / "out"
    return ["shard", *map(str, argv), "--output", str(out), "--tokenizer", str(TOKENIZER), "--no-progress"]


@pytest.mark.parametrize(
    "option",
    [
        ["--rows-per-shard", "-5"],
        ["--rows-per-shard", "0"],
        ["--shard-size", "0"],
        ["--member-size", "-1"],
        ["--piece-size", "0"],
        ["--workers", "0"],
        ["--num-tasks", "0", "--task-index", "0"],
    ],
)
def test_counts_below_one_are_refused(option, tmp_path, docs, capsys):
    assert main([*shard(tmp_path, docs, "--seq-len", "8"), *option]) == 2
    assert f"{option[0]} must be ≥ 1, got {option[1]}" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_an_empty_split_is_not_reported_as_success(tmp_path, docs, capsys):
    assert main([*shard(tmp_path, docs, "--seq-len", "8"), "--valid-fraction", "1e-9"]) == 0
    assert "warning: the valid split is empty (0 documents held out)" in capsys.readouterr().err
    out = tmp_path / "all-valid"
    argv = ["shard", str(docs), "--output", str(out), "--tokenizer", str(TOKENIZER), "--seq-len", "8"]
    assert main([*argv, "--valid-fraction", "0.99999", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "the train split is empty: all 50 documents went to validation (--valid-fraction 0.99999)" in err
    assert not out.exists()


def test_tokenizer_train_names_a_bad_input_in_one_line(tmp_path, capsys):
    out = tmp_path / "tok"
    assert main(["tokenizer", "train", str(tmp_path / "nonexist.jsonl"), "--output", str(out)]) == 2
    assert f"ds-train: error: input not found: {tmp_path / 'nonexist.jsonl'}" in capsys.readouterr().err
    (tmp_path / "bad.jsonl").write_text('{"x": 1}\n')
    assert main(["tokenizer", "train", str(tmp_path / "bad.jsonl"), "--output", str(out)]) == 2
    assert "no 'text' field (found ['x']); pass --text-field" in capsys.readouterr().err
    assert not out.exists()


def test_an_output_that_is_a_file_is_refused(tmp_path, docs, capsys):
    (tmp_path / "out").write_text("a file")
    for argv in (shard(tmp_path, docs, "--seq-len", "8"), shard(tmp_path, "--merge")):
        assert main(argv) == 2
        assert f"--output {tmp_path / 'out'}: exists and is not a directory" in capsys.readouterr().err
    assert (tmp_path / "out").read_text() == "a file"


def test_merge_refuses_layout_options_it_would_ignore(tmp_path, docs, capsys):
    """--merge writes the layout the tasks planned: --rows-per-shard (or --tokenizer, --seq-len…)
    given to it was ignored, silently; it is refused, naming the options and the plan."""
    out = tmp_path / "out"
    task = shard(
        tmp_path, docs, "--seq-len", "8", "--rows-per-shard", "5", "--task-index", "0", "--num-tasks", "1"
    )
    assert main(task) == 0
    merge = ["shard", "--merge", "--output", str(out), "--no-progress"]
    assert main([*merge, "--rows-per-shard", "7", "--tokenizer", str(TOKENIZER)]) == 2
    err = capsys.readouterr().err
    assert "takes no --tokenizer, --rows-per-shard: give them to the tasks' command" in err
    assert str(out / ".shard-work" / "plan.json") in err and not (out / "train").exists()
    assert main([*merge, "--workers", "2"]) == 0  # what a merge does take
    rows = [s["rows"] for s in json.loads((out / "train" / "index.json").read_text())["shards"]]
    assert len(rows) > 1 and set(rows[:-1]) == {5}  # the planned layout, not the merge's --rows-per-shard


def test_bos_is_a_choice_of_the_tokenizing_run(tmp_path, docs, capsys):
    """--bos shapes the token stream: an --sft run (chat templates carry their own) and a --merge
    (the tasks planned it) refuse it."""
    sft = tmp_path / "sft.jsonl"
    sft.write_text('{"prompt": "a", "response": "b"}\n')
    assert main([*shard(tmp_path, sft, "--seq-len", "8"), "--sft", "--bos", "always"]) == 2
    assert "--bos applies to pretraining corpora" in capsys.readouterr().err
    assert main(["shard", "--merge", "--output", str(tmp_path / "out"), "--bos", "never"]) == 2
    assert "takes no --bos" in capsys.readouterr().err
