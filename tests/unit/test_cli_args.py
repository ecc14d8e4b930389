"""Command-line parsing: `key=value` overrides may follow the flags, for every command that takes them."""

from __future__ import annotations

import pytest

from ds_train.cli import build_parser, main, parse_args


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["pretrain", "run.yaml", "a.b=1", "--check", "c.d=2", "a.b=3"], "check"),
        (["finetune", "run.yaml", "--print-config", "a.b=1", "c.d=2", "a.b=3"], "print_config"),
        (["plan", "run.yaml", "a.b=1", "--world-size", "2", "c.d=2", "a.b=3"], "world_size"),
        (["data", "order", "run.yaml", "a.b=1", "--valid", "c.d=2", "a.b=3"], "valid"),
        (["data", "show", "run.yaml", "--step", "3", "a.b=1", "c.d=2", "a.b=3"], "step"),
        (
            ["slurm", "prepare", "pretrain", "run.yaml", "--launcher", "srun", "a.b=1", "c.d=2", "a.b=3"],
            "launcher",
        ),
    ],
)
def test_overrides_may_follow_flags_and_keep_their_order(argv, flag):
    args = parse_args(build_parser(), argv)
    assert args.overrides == ["a.b=1", "c.d=2", "a.b=3"]  # the last one still wins
    assert getattr(args, flag)


def test_unknown_flags_and_stray_words_are_still_refused(capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(build_parser(), ["pretrain", "run.yaml", "--check", "--bogus", "a.b=1"])
    assert e.value.code == 2 and "unrecognized arguments: --bogus" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # no overrides to join
        parse_args(build_parser(), ["config", "a.b=1"])


def test_an_override_after_check_is_applied(tmp_path, shards, capsys):
    from tests.helpers import base_config, write_config

    cfg = write_config(tmp_path / "run.yaml", base_config(tmp_path / "run", shards))
    assert main(["pretrain", str(cfg), "--check", "train.lr=abc"]) == 2
    assert "train.lr: expected a number, got 'abc'" in capsys.readouterr().err


def test_a_reader_that_leaves_early_gives_no_traceback():
    # `ds-train config | head -3`: the pipe closes before the output is written
    import subprocess
    import sys

    from tests.helpers import REPO, clean_env

    proc = subprocess.Popen(
        [sys.executable, "-m", "ds_train", "config"],
        cwd=REPO,
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    proc.stdout.close()  # before the child has started writing
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141, err
    assert err == ""
