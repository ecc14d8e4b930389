"""`ds-train report`: metrics.jsonl (resumes included) → a PNG with loss, throughput, MFU and
optimizer panels holding the logged values."""

from __future__ import annotations

import json

import pytest

from ds_train.report.plots import PANELS, build_figure, summary, write_report
from ds_train.report.series import load_run_metrics
from tests.helpers import run_cli


def _train(step: int, loss: float, *, mfu: float | None = 0.4, tps: float = 1000.0, world: int = 2) -> dict:
    return {"step": step, "loss": loss, "lr": 1e-3, "grad_norm": 0.5, "tokens_per_s": tps,
            "tokens_per_s_per_device": tps / world, "step_time_s": 0.5, "mfu": mfu, "world_size": world,
            "data_wait_frac": 0.9 if step == 1 else 0.1, "peak_reserved_gib": 4.0 + step / 8,
            "alloc_retries": step // 4, "interval_steps": 1}  # fmt: skip


def _write(run_dir, records) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


@pytest.fixture
def resumed_run(tmp_path):
    """Steps 1-6 logged, a crash, a resume from the step-4 checkpoint that re-logs 5-6 and goes on."""
    first = [_train(s, 10.0 - s) for s in range(1, 7)] + [{"step": 4, "valid_loss": 6.5, "valid_ppl": 665.0}]
    second = [_train(s, 9.0 - s, tps=2000.0) for s in range(5, 9)] + [{"step": 8, "valid_loss": 1.5}]
    first[0]["startup_s"] = second[0]["startup_s"] = 3.0
    _write(tmp_path / "run", first + second)
    return tmp_path / "run"


def test_series_keep_the_resumed_attempt_and_mark_the_resume(resumed_run):
    m = load_run_metrics(resumed_run)
    assert m.loss.steps == [1, 2, 3, 4, 5, 6, 7, 8]
    assert m.loss.values[4:] == [4.0, 3.0, 2.0, 1.0]  # steps 5-6 from the resumed attempt
    assert m.tokens_per_s.values == [1000.0] * 4 + [2000.0] * 4
    assert m.valid_loss.steps == [4, 8] and m.valid_loss.values == [6.5, 1.5]
    assert m.resumes == [4]  # the checkpoint's step, where the resumed attempt's first interval began
    assert m.world_sizes == [2]


def test_resume_on_other_ranks_and_after_a_whole_interval(tmp_path):
    """A 2-rank attempt logging every 2 steps stops after its step-4 log line (and checkpoint); a
    1-rank attempt resumes there: the file never goes back in steps, the start-up time marks it."""
    first = [{**_train(s, 5.0), "interval_steps": 2} for s in (2, 4)]
    second = [{**_train(s, 4.0, world=1), "interval_steps": 2} for s in (6, 8)]
    first[0]["startup_s"] = second[0]["startup_s"] = 3.0
    _write(tmp_path, first + second)
    m = load_run_metrics(tmp_path)
    assert m.resumes == [4] and m.world_sizes == [2, 1]
    fig = build_figure(m, "elastic")
    assert (
        next(ax for ax in fig.axes if ax.get_gid() == "throughput").get_title() == "throughput (2 → 1 ranks)"
    )


def test_figure_has_every_panel_with_the_logged_values(resumed_run):
    m = load_run_metrics(resumed_run)
    fig = build_figure(m, "run")
    axes = {ax.get_gid(): ax for ax in fig.axes}
    assert set(PANELS) | {"lr"} == set(axes)
    loss_lines = {line.get_label(): line for line in axes["loss"].get_lines()}
    assert list(loss_lines["train"].get_ydata()) == m.loss.values
    assert list(loss_lines["valid"].get_xdata()) == [4, 8]
    assert "resumed" in loss_lines
    tps = axes["throughput"].get_lines()[0]
    assert list(tps.get_ydata()) == m.tokens_per_s.values
    mfu = axes["mfu"].get_lines()[0]
    assert list(mfu.get_ydata()) == pytest.approx([40.0] * 8)  # percent
    assert axes["mfu"].get_ylabel() == "MFU (%)"
    assert list(axes["optimizer"].get_lines()[0].get_ydata()) == [0.5] * 8


def test_each_validation_set_is_a_curve(tmp_path):
    evals = [
        {"step": s, "valid_loss": 3.0 / s, "valid_loss/web": 2.0 / s, "valid_loss/code": 4.0 / s}
        for s in (2, 4)
    ]
    _write(tmp_path, [_train(s, 5.0) for s in range(1, 5)] + evals)
    m = load_run_metrics(tmp_path)
    assert {k: (v.steps, v.values) for k, v in m.valid_loss_by_set.items()} == {
        "web": ([2, 4], [1.0, 0.5]),
        "code": ([2, 4], [2.0, 1.0]),
    }
    lines = {line.get_label(): line for line in build_figure(m, "mix").axes[0].get_lines()}
    assert list(lines["valid: code"].get_ydata()) == [2.0, 1.0] and "valid: web" in lines


def test_each_training_source_of_a_mixture_is_a_curve(tmp_path):
    _write(
        tmp_path,
        [{**_train(s, 5.0), "loss/web": 4.0 / s, **({"loss/code": 6.0} if s > 1 else {})} for s in (1, 2)],
    )
    m = load_run_metrics(tmp_path)
    assert {k: (v.steps, v.values) for k, v in m.loss_by_source.items()} == {
        "web": ([1, 2], [4.0, 2.0]),
        "code": ([2], [6.0]),  # no row of it in the first interval
    }
    lines = {line.get_label(): line for line in build_figure(m, "mix").axes[0].get_lines()}
    assert list(lines["train: web"].get_ydata()) == [4.0, 2.0] and "train: code" in lines


def test_without_mfu_the_panel_shows_step_time(tmp_path):
    _write(tmp_path, [_train(s, 5.0, mfu=None) for s in range(1, 4)])
    fig = build_figure(load_run_metrics(tmp_path), "cpu run")
    gids = {ax.get_gid() for ax in fig.axes}
    assert "step_time" in gids and "mfu" not in gids
    ax = next(ax for ax in fig.axes if ax.get_gid() == "step_time")
    assert list(ax.get_lines()[0].get_ydata()) == [0.5, 0.5, 0.5]
    # metrics written before data_wait_frac existed: no data line rather than a made-up one
    _write(tmp_path, [{k: v for k, v in _train(s, 5.0).items() if k != "data_wait_frac"} for s in (1, 2)])
    assert not any("waiting for data" in line for line in summary(load_run_metrics(tmp_path)))


def test_write_report_writes_a_png(resumed_run, tmp_path):
    out = write_report(resumed_run, tmp_path / "plots" / "r.png")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000  # four drawn panels, not a blank canvas
    lines = summary(load_run_metrics(resumed_run))
    assert lines[0] == "train loss: 9.0000 → 1.0000 (step 8)"
    assert any(line.startswith("valid loss: last 1.5000, best 1.5000 (step 8)") for line in lines)
    assert "MFU: median 40.0%" in lines
    # the first interval (time to the first batch) is left out of the median
    assert "waiting for data: median 10.0% of step time (slowest rank)" in lines
    assert "device memory: peak 5.0 GiB reserved (fullest rank)" in lines
    assert any(line.startswith("cudaMalloc retries: 2 by step 8") for line in lines)


def test_cli_report(resumed_run, tmp_path):
    for rank in (10, 2):  # profile summaries (profile.*) are listed by rank number
        window = resumed_run / "profile" / "steps_3-4"
        window.mkdir(parents=True, exist_ok=True)
        summary = {"steps": [3, 4], "step_ms": [100.0 * rank, 100.0 * rank], "window_ms": 0.0, "device": None}
        (window / f"rank{rank}.summary.json").write_text(json.dumps(summary))
    out = run_cli(["report", resumed_run]).stdout
    assert (
        f"profile (rank 2): steps 3-4: 200.0 ms/step [{window}]\n"
        f"profile (rank 10): steps 3-4: 1,000.0 ms/step [{window}]\n"
    ) in out
    assert (resumed_run / "report.png").stat().st_size > 20_000
    assert f"wrote {resumed_run / 'report.png'}" in out
    bad = run_cli(["report", tmp_path / "empty"], check=False)
    assert bad.returncode == 2 and "metrics.jsonl" in bad.stderr


def test_summary_names_the_rank_most_often_slowest(tmp_path):
    skew = {1: (1, 1.1), 2: (1, 1.8), 3: (0, 1.02), 4: (1, 1.3)}  # step: (slowest rank, ratio)
    _write(
        tmp_path,
        [{**_train(s, 5.0), "slowest_rank": r, "slowest_forward_ratio": q} for s, (r, q) in skew.items()],
    )
    lines = [line for line in summary(load_run_metrics(tmp_path)) if line.startswith("slowest rank")]
    assert lines == [
        "slowest rank: rank 1 in 3 of 4 log lines; the slowest rank's forwards took 1.20x the other "
        "ranks' median (median over lines), 1.80x at worst (step 2, rank 1)"
    ]
    _write(tmp_path, [_train(s, 5.0) for s in (1, 2)])  # one rank, or an older ds-train: no line
    assert not any(line.startswith("slowest rank") for line in summary(load_run_metrics(tmp_path)))


def test_skipped_updates_are_marked_and_summarised(tmp_path):
    """train.skip_spike_sigma: the log lines whose interval skipped an update get a marker on the
    loss curve and a summary line; a run without skips gets neither."""
    counts = {1: 0, 2: 0, 3: 1, 4: 1, 5: 3, 6: 3}
    _write(tmp_path, [{**_train(s, 5.0 + (s in (3, 5))), "skipped_steps": n} for s, n in counts.items()])
    m = load_run_metrics(tmp_path)
    lines = {line.get_label(): line for line in build_figure(m, "spiky").axes[0].get_lines()}
    marks = lines["update skipped (spike)"]
    assert list(marks.get_xdata()) == [3, 5] and list(marks.get_ydata()) == [6.0, 6.0]
    assert (
        "updates skipped on a loss or gradient-norm spike: 3, in the log intervals ending at step(s) 3, 5"
        in summary(m)
    )
    _write(tmp_path, [_train(s, 5.0) for s in (1, 2)])  # none, or an older ds-train
    m = load_run_metrics(tmp_path)
    assert not any("skipped" in line for line in summary(m))
    assert "update skipped (spike)" not in {
        line.get_label() for line in build_figure(m, "x").axes[0].get_lines()
    }


def test_layer_norms_are_drawn_per_layer_and_their_largest_excursion_named(tmp_path):
    """train.per_layer_norms_every: a heatmap per norm (rows: layers in model order) and a summary
    line naming the layer whose gradient norm rose furthest above its own median; none without."""
    import math

    from ds_train.report.per_layer_norms import largest_excursion, write_layer_figure

    groups = ["model.embed_tokens", "model.layers.0", "model.layers.1", "lm_head"]
    records = []
    for s in (2, 4, 6, 8):
        grad = {g: 10.0 * (g == "lm_head") + 1.0 for g in groups}
        if s == 6:
            grad["model.layers.1"] = 7.0  # 7x its median of 1
        records.append(
            {**_train(s, 5.0), "layer_grad_norm": grad, "layer_weight_norm": dict.fromkeys(groups, 3.0)}
        )
    _write(tmp_path, [_train(1, 5.0), *records])
    m = load_run_metrics(tmp_path)
    assert m.layers.steps == [2, 4, 6, 8] and m.layers.groups == groups
    assert m.layers.grad[2] == [1.0, 1.0, 7.0, 1.0] and m.layers.weight[0] == [3.0] * 4
    assert largest_excursion(m.layers) == ("model.layers.1", 6, 7.0)  # not the head, large throughout
    assert (
        "layer norms: 4 layers at 4 steps; largest gradient norm against its layer's median: model.layers.1, 7.0x at step 6"
        in summary(m)
    )
    out = write_layer_figure(m.layers, tmp_path / "per_layer_norms.png", "t")
    assert out.stat().st_size > 10_000
    # a layer first measured later (a resume with more layers unfrozen) is blank before
    records[-1]["layer_grad_norm"]["extra"] = 2.0
    _write(tmp_path, records)
    m = load_run_metrics(tmp_path)
    assert m.layers.groups[-1] == "extra" and all(math.isnan(v) for v in m.layers.grad[-1][:3])
    _write(tmp_path, [_train(s, 5.0) for s in (1, 2)])
    m = load_run_metrics(tmp_path)
    assert not len(m.layers) and not any(line.startswith("layer norms") for line in summary(m))


def test_changes_of_the_global_batch_are_marked_on_the_throughput(tmp_path):
    """train.batch_ramp: smaller batches run at fewer tokens/s; the report says where they changed."""
    batches = {1: 4, 2: 4, 3: 8, 4: 8, 5: 16, 6: 16}
    _write(tmp_path, [{**_train(s, 5.0), "global_batch_size": b} for s, b in batches.items()])
    m = load_run_metrics(tmp_path)
    assert (
        "global batch: 4 → 8 by step 3, 8 → 16 by step 5 (train.batch_ramp, or a forced resume)" in summary(m)
    )
    tps = next(ax for ax in build_figure(m, "ramp").axes if ax.get_gid() == "throughput")
    marks = [line for line in tps.get_lines() if line.get_linestyle() == "-."]
    assert [line.get_xdata()[0] for line in marks] == [3, 5]
    _write(tmp_path, [_train(s, 5.0) for s in (1, 2)])  # one batch, or an older ds-train
    assert not any(line.startswith("global batch") for line in summary(load_run_metrics(tmp_path)))
