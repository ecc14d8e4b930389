"""`ds-train report RUN_A RUN_B ...`: several runs on one figure (by step, by tokens, validation,
throughput) and a table, with each run's losses at the last step all of them logged."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ds_train.checkpoint.start_point import write_lineage
from ds_train.config import ConfigError
from ds_train.report.compare import PANELS, build_comparison, comparison_lines, run_labels
from ds_train.report.series import load_run_metrics
from tests.helpers import run_cli


def _write(run_dir: Path, steps, loss, *, tokens_per_step: int, valid: dict | None = None) -> Path:
    run_dir.mkdir(parents=True)
    lines = [
        {"step": s, "loss": loss(s), "tokens": s * tokens_per_step, "tokens_per_s": 1000.0 * tokens_per_step,
         "interval_steps": 1}
        for s in steps
    ]  # fmt: skip
    lines += [{"step": s, "valid_loss": v} for s, v in (valid or {}).items()]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return run_dir


@pytest.fixture
def runs(tmp_path):
    """`base` (8 steps of 64 tokens), `wide` (6 steps of 128 tokens) and `cooldown`, a branch off
    base's step 4 that logs steps 5-10."""
    base = _write(
        tmp_path / "base", range(1, 9), lambda s: 5 - 0.25 * s, tokens_per_step=64, valid={4: 4.2, 8: 3.4}
    )
    wide = _write(tmp_path / "wide", range(1, 7), lambda s: 5 - 0.4 * s, tokens_per_step=128, valid={4: 3.5})
    cooldown = _write(tmp_path / "cooldown", range(5, 11), lambda s: 4.5 - 0.3 * s, tokens_per_step=64,
                      valid={8: 2.0})  # fmt: skip
    ckpt = base / "checkpoints" / "step_00000004"
    write_lineage(cooldown, str(ckpt), [{"checkpoint": str(ckpt), "step": 4, "run_dir": str(base)}])
    return base, wide, cooldown


def test_the_figure_draws_every_run_by_step_and_by_tokens(runs):
    metrics = {d.name: load_run_metrics(d) for d in runs}
    fig = build_comparison(metrics, "3 runs")
    axes = {ax.get_gid(): ax for ax in fig.axes}
    assert set(axes) == set(PANELS)
    by_step = {line.get_label(): line for line in axes["loss_by_step"].get_lines()}
    assert list(by_step["wide"].get_ydata()) == pytest.approx([5 - 0.4 * s for s in range(1, 7)])
    # the branch's parent is drawn as itself: no dashed copy of it before the branch point
    assert not [line for line in axes["loss_by_step"].get_lines() if line.get_linestyle() == "--"]
    by_tokens = {line.get_label(): line for line in axes["loss_by_tokens"].get_lines()}
    assert list(by_tokens["wide"].get_xdata()) == [128 * s for s in range(1, 7)]
    assert list(by_tokens["base"].get_xdata()) == [64 * s for s in range(1, 9)]
    valid = {line.get_label(): line for line in axes["valid_loss"].get_lines()}
    assert list(valid["base"].get_xdata()) == [4, 8] and list(valid["cooldown"].get_ydata()) == [2.0]
    tps = {line.get_label(): line for line in axes["throughput"].get_lines()}
    assert set(tps) == {"base", "wide", "cooldown"}
    # without its parent in the comparison, the branch draws the parent's curve up to the branch
    alone = build_comparison({k: metrics[k] for k in ("wide", "cooldown")}, "2 runs")
    dashed = [line for line in alone.axes[0].get_lines() if line.get_linestyle() == "--"]
    assert len(dashed) == 1 and list(dashed[0].get_xdata()) == [1, 2, 3, 4]


def test_the_table_compares_at_the_last_step_every_run_logged(runs):
    metrics = {d.name: load_run_metrics(d) for d in runs}
    lines = comparison_lines(metrics)
    assert lines[0].split()[:3] == ["run", "steps", "train"]
    rows = {line.split()[0]: line.split() for line in lines[1:4]}
    assert rows["base"][1:3] == ["8", "3.0000"] and rows["wide"][1:3] == ["6", "2.6000"]
    assert rows["cooldown"][1:3] == ["10", "1.5000"]
    assert rows["base"][3:6] == ["3.4000", "(3.4000", "@"]
    # step 6: the last wide logged; the branch has its parent's loss before step 5
    assert (
        "train loss at step 6, the last every run logged: base 3.5000, wide 2.6000, cooldown 2.7000" in lines
    )
    # no step that all three evaluated: no such line
    assert not any(line.startswith("valid loss at step") for line in lines)


def test_the_table_compares_downstream_tasks_every_run_scored(tmp_path):
    runs = {}
    for name, accs in (("a", {4: 0.25, 8: 0.5}), ("b", {8: 0.75, 12: 1.0})):
        run = _write(tmp_path / name, range(1, 13), lambda s: 3.0, tokens_per_step=8)
        with open(run / "metrics.jsonl", "a") as fh:
            for step, acc in accs.items():
                extra = {"downstream/only_a/acc": 0.1} if name == "a" else {}
                fh.write(json.dumps({"step": step, "downstream/quiz/acc": acc, **extra}) + "\n")
        runs[name] = load_run_metrics(run)
    lines = comparison_lines(runs)
    assert "downstream quiz/acc at step 8, the last every run logged: a 0.5000, b 0.7500" in lines
    assert not any("only_a" in line for line in lines)  # a task one run did not score


def test_labels_disambiguate_runs_of_one_name(tmp_path):
    dirs = [tmp_path / "a" / "run", tmp_path / "b" / "run", tmp_path / "c"]
    assert run_labels(dirs) == ["a/run", "b/run", "c"]
    deeper = [tmp_path / "a" / "x" / "run", tmp_path / "b" / "x" / "run"]
    assert run_labels(deeper) == ["a/x/run", "b/x/run"]
    with pytest.raises(ConfigError, match="given twice"):
        run_labels([tmp_path / "c", tmp_path / "c" / ".." / "c"])


def test_cli_compares_several_runs(runs, tmp_path):
    out_png = tmp_path / "figs" / "cmp.png"
    out = run_cli(["report", *runs, "-o", out_png]).stdout
    assert out_png.stat().st_size > 20_000 and f"wrote {out_png}" in out
    assert "the last every run logged" in out
    assert not (runs[0] / "report.png").exists()  # a comparison writes no run's own report
    bad = run_cli(["report", runs[0], tmp_path / "nowhere"], check=False)
    assert bad.returncode == 2 and "nowhere has no metrics.jsonl" in bad.stderr
