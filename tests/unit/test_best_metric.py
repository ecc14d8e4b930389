"""train.best_metric / keep_best / early_stopping_patience: which evaluation is best, when to stop,
and that a run stopped early ends like a finished one with its best checkpoint kept."""

from __future__ import annotations

import re

import pytest

from ds_train.config import ConfigError, load_config
from ds_train.train.best_metric import BestMetric, lower_is_better
from tests.helpers import base_config, read_metrics, run_cli, write_config


def test_the_direction_follows_the_metric_name():
    assert (
        lower_is_better("valid_loss") and lower_is_better("valid_loss/web") and lower_is_better("valid_ppl")
    )
    assert not lower_is_better("valid_accuracy") and not lower_is_better("valid_macro_f1")


def test_patience_counts_evaluations_since_the_best():
    best = BestMetric("valid_loss")
    assert [best.update({"valid_loss": v}, step) for step, v in ((2, 5.0), (4, 4.0), (6, 4.0), (8, 4.5))] == [
        True, True, False, False,
    ]  # fmt: skip
    assert (best.best, best.best_step, best.evals_since_best) == (4.0, 4, 2)  # equal is not better
    assert best.exhausted(2) and not best.exhausted(3) and not best.exhausted(0)
    acc = BestMetric("valid_accuracy")
    acc.update({"valid_accuracy": 0.5}, 1)
    assert acc.update({"valid_accuracy": 0.7}, 2) and not acc.update({"valid_accuracy": 0.6}, 3)
    # resumed: the count goes on; another metric starts afresh
    again = BestMetric.from_state("valid_loss", best.state())
    assert (again.best, again.best_step, again.evals_since_best) == (4.0, 4, 2)
    assert BestMetric.from_state("valid_accuracy", best.state()).best is None


def test_a_missing_metric_never_stops_the_run(caplog):
    best = BestMetric("valid_accuracy")
    for step in range(1, 5):
        assert not best.update({"valid_loss": 1.0}, step)
    assert not best.exhausted(1) and caplog.text.count("is not in the evaluation record") == 1


def test_a_nan_evaluation_is_no_improvement(caplog):
    """A diverged run's NaN loss counted as a missing figure, so its patience never ran out (review)."""
    best = BestMetric("valid_loss")
    best.update({"valid_loss": 3.0}, 2)
    assert not best.update({"valid_loss": float("nan")}, 4) and not best.update(
        {"valid_loss": float("nan")}, 6
    )
    assert best.exhausted(2) and "valid_loss is NaN at step 4: counted as no improvement" in caplog.text
    assert "is not in the evaluation record" not in caplog.text


@pytest.mark.parametrize(
    ("train", "valid", "expected"),
    [
        ({"early_stopping_patience": 2, "eval_every": 2}, False, "need validation data"),
        ({"early_stopping_patience": 2}, True, "need evaluations during the run: set train.eval_every"),
        ({"keep_best": True, "eval_every": 3, "save_every": 2}, True, "make train.eval_every (3) a multiple"),
        # a mistyped figure was only warned at the first evaluation, then nothing acted (review)
        (
            {"early_stopping_patience": 2, "eval_every": 2, "best_metric": "valid_los"},
            True,
            "train.best_metric=valid_los is not a figure of this run's evaluations (did you mean 'valid_loss'?)",
        ),
        (
            {"early_stopping_patience": 2, "eval_every": 2, "best_metric": "valid_accuracy"},
            True,
            "they give valid_loss, valid_ppl, valid_tokens",
        ),
    ],
)
def test_settings_that_could_never_act_are_refused(tmp_path, shards, train, valid, expected):
    from ds_train.train import pretrain

    raw = base_config(tmp_path / "run", shards, train=train)
    if valid:
        raw["data"]["valid"] = str(shards / "valid")
    with pytest.raises(ConfigError, match=re.escape(expected)):
        pretrain.check(load_config(write_config(tmp_path / "c.yaml", raw)))


@pytest.mark.slow
def test_early_stopping_ends_the_run_and_keeps_the_best_checkpoint(tmp_path, shards):
    """valid_tokens never changes: its first evaluation (step 2) stays the best, patience 2 ends
    the run after the evaluation at step 6 (of 10), and keep_best spares step 2 from keep_last=1."""
    raw = base_config(
        tmp_path / "run", shards,
        train={"max_steps": 10, "eval_every": 2, "save_every": 2, "keep_last": 1, "keep_best": True,
               "early_stopping_patience": 2, "best_metric": "valid_tokens"},
    )  # fmt: skip
    raw["data"]["valid"] = str(shards / "valid")
    proc = run_cli(["pretrain", write_config(tmp_path / "c.yaml", raw)])
    metrics = read_metrics(tmp_path / "run")
    assert [r["step"] for r in metrics if "valid_loss" in r] == [2, 4, 6]
    assert max(r["step"] for r in metrics if "loss" in r) == 6
    kept = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step_*"))
    assert kept == ["step_00000002", "step_00000006"]
    assert "early stopping at step 6: valid_tokens has not improved for 2 evaluations" in proc.stderr
    assert "best valid_tokens" in proc.stderr and "at step 2; its checkpoint" in proc.stderr
    again = run_cli(["pretrain", tmp_path / "c.yaml"])  # the same command: it stopped, it stays stopped
    assert "this run stopped early at step 6" in again.stderr
    assert max(r["step"] for r in read_metrics(tmp_path / "run") if "loss" in r) == 6


def test_keep_every_spares_its_multiples_from_pruning(tmp_path):
    """train.keep_every: a wsd run's stable-phase checkpoints stay, to branch cooldowns from."""
    from types import SimpleNamespace

    from ds_train.checkpoint.layout import STATE_FILE, checkpoints_dir
    from ds_train.checkpoint.manager import CheckpointManager

    manager = CheckpointManager(tmp_path, SimpleNamespace(rank=0, is_main=True), keep_last=1)
    manager.keep_every = 4
    for step in range(2, 12, 2):
        d = checkpoints_dir(tmp_path) / f"step_{step:08d}"
        d.mkdir(parents=True)
        (d / STATE_FILE).write_text("{}")
    manager._prune()
    kept = sorted(int(p.name[5:]) for p in checkpoints_dir(tmp_path).glob("step_*"))
    assert kept == [4, 8, 10]


def test_the_old_best_checkpoint_stays_until_the_new_one_is_written(tmp_path):
    """keep_best with save_async: a background save completing after a new best evaluation pruned
    the old best before the new best's checkpoint existed (review)."""
    from types import SimpleNamespace

    from ds_train.checkpoint.layout import STATE_FILE, checkpoints_dir
    from ds_train.checkpoint.manager import CheckpointManager

    manager = CheckpointManager(tmp_path, SimpleNamespace(rank=0, is_main=True), keep_last=1)

    def written(step: int) -> None:
        d = checkpoints_dir(tmp_path) / f"step_{step:08d}"
        d.mkdir(parents=True)
        (d / STATE_FILE).write_text("{}")

    for step in (2, 4):
        written(step)
    manager.keep_best_step(2)
    manager._prune()
    manager.keep_best_step(6)  # evaluated best at 6; step 6's checkpoint not written yet
    written(5)  # a background save of step 5 completes and prunes
    manager._prune()
    steps = lambda: sorted(p.name for p in checkpoints_dir(tmp_path).glob("step_*"))  # noqa: E731
    assert steps() == ["step_00000002", "step_00000005"]
    written(6)
    manager._prune()  # step 6's is complete: the old best may go
    assert steps() == ["step_00000006"]


@pytest.mark.slow
def test_patience_running_out_at_max_steps_is_a_normal_end(tmp_path, shards):
    """Patience used up by the evaluation at max_steps: the run finished, it did not stop early,
    so a longer max_steps trains on (it said "stopped early at step 6" and trained nothing: review)."""
    train = {"max_steps": 6, "eval_every": 2, "early_stopping_patience": 2, "best_metric": "valid_tokens"}
    raw = base_config(tmp_path / "run", shards, train=train)
    raw["data"]["valid"] = str(shards / "valid")
    run_cli(["pretrain", write_config(tmp_path / "c.yaml", raw)])
    raw["train"]["max_steps"] = 10
    again = run_cli(["pretrain", write_config(tmp_path / "c.yaml", raw)])
    assert "stopped early at step 6" not in again.stderr
    assert "early stopping at step 8" in again.stderr  # one more evaluation without improvement
    assert max(r["step"] for r in read_metrics(tmp_path / "run") if "loss" in r) == 8
