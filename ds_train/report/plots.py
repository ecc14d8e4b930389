"""The run report figure: loss (train + valid), throughput, MFU, gradient norm and learning rate.

Rendered with matplotlib's Agg backend (no display needed, safe on cluster nodes). Panels that
have no data say why instead of staying blank (MFU needs a known peak FLOP/s: GPUs ds-train
knows, or train.peak_flops).
"""

from __future__ import annotations

import statistics
from pathlib import Path

from ds_train.report.agg_pyplot import agg_pyplot, panel_grid
from ds_train.report.per_layer_norms import summary_line
from ds_train.report.series import RunMetrics, Series, batch_changes, skip_steps

PANELS = ("loss", "throughput", "mfu", "optimizer")


def _formatter(fn):
    from matplotlib.ticker import FuncFormatter

    return FuncFormatter(lambda value, _pos: fn(value))


def _ranks_label(world_sizes: list[int]) -> str:
    """'2 ranks', or '2 → 1 ranks' for a run resumed on another number of ranks."""
    return f"{' → '.join(map(str, world_sizes))} rank{'s' if world_sizes != [1] else ''}"


def _mark_resumes(ax, metrics: RunMetrics) -> None:
    for i, step in enumerate(metrics.resumes):
        ax.axvline(step, color="0.6", linestyle=":", linewidth=1, label="resumed" if i == 0 else None)


def _empty(ax, title: str, why: str) -> None:
    ax.set_title(title)
    ax.text(0.5, 0.5, why, ha="center", va="center", transform=ax.transAxes, color="0.4", wrap=True)
    ax.set_xticks([])
    ax.set_yticks([])


def _median_line(ax, s: Series, fmt) -> None:
    """A dashed median over the steady state (first logged interval excluded: start-up)."""
    steady = s.values[1:] if len(s) > 2 else s.values
    med = statistics.median(steady)
    ax.axhline(med, color="C3", linestyle="--", linewidth=1, label=f"median {fmt(med)}")


def build_figure(metrics: RunMetrics, title: str):
    """The report figure (2×2 panels), not yet saved; axes carry `gid`s naming their panel
    (loss, throughput, mfu or step_time, optimizer, and lr for the twin axis)."""
    fig, axes = panel_grid(title, PANELS)
    ax_loss, ax_tps, ax_mfu, ax_opt = axes.flat

    ax_loss.set_title("loss")
    if len(metrics.before_branch):  # the run this one branched off (run.start_from), up to the branch
        parent = Path(metrics.lineage[-1]["run_dir"]).name
        ax_loss.plot(metrics.before_branch.steps, metrics.before_branch.values, "--", color="0.55",
                     linewidth=1, label=f"train: {parent}, before the branch")  # fmt: skip
    if len(metrics.loss):
        ax_loss.plot(metrics.loss.steps, metrics.loss.values, color="C0", linewidth=1.5, label="train")
    if len(metrics.valid_loss):
        ax_loss.plot(
            metrics.valid_loss.steps, metrics.valid_loss.values, "o-", color="C1", markersize=5, label="valid"
        )
    for k, (name, series) in enumerate(sorted(metrics.loss_by_source.items())):
        ax_loss.plot(
            series.steps, series.values, ":", color=f"C{3 + k % 7}", linewidth=1, label=f"train: {name}"
        )
    for k, (name, series) in enumerate(sorted(metrics.valid_loss_by_set.items())):
        ax_loss.plot(
            series.steps, series.values, "^--", color=f"C{3 + k % 7}", markersize=4, label=f"valid: {name}"
        )
    skipped = set(skip_steps(metrics))
    if skipped:  # the interval's loss, which includes the spike that was not trained on
        at = [(st, v) for st, v in zip(metrics.loss.steps, metrics.loss.values) if st in skipped]
        ax_loss.plot(*zip(*at), "x", color="C3", markersize=8, label="update skipped (spike)")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("cross-entropy (nats/token)")
    _mark_resumes(ax_loss, metrics)
    ax_loss.legend(loc="upper right")

    if len(metrics.tokens_per_s):
        ax_tps.set_title("throughput")
        ax_tps.plot(metrics.tokens_per_s.steps, metrics.tokens_per_s.values, color="C2", label="all ranks")
        _median_line(ax_tps, metrics.tokens_per_s, lambda v: f"{v:,.0f} tok/s")
        ax_tps.set_xlabel("step")
        ax_tps.set_ylabel("tokens / s")
        ax_tps.set_ylim(0, 1.15 * max(metrics.tokens_per_s.values))
        ax_tps.yaxis.set_major_formatter(_formatter(lambda v: f"{v:,.0f}"))
        if metrics.world_sizes:
            ax_tps.set_title(f"throughput ({_ranks_label(metrics.world_sizes)})")
        for i, (step, before, after) in enumerate(batch_changes(metrics)):  # smaller batches run slower
            ax_tps.axvline(step, color="C1", linestyle="-.", linewidth=1,
                           label="global batch changed" if i == 0 else None)  # fmt: skip
            ax_tps.annotate(f"{before}→{after}", (step, 0), xytext=(2, 4), textcoords="offset points",
                            fontsize=7, color="C1")  # fmt: skip
        _mark_resumes(ax_tps, metrics)
        ax_tps.legend(loc="lower right")
    else:
        _empty(ax_tps, "throughput", "no training steps logged")

    if len(metrics.mfu):
        ax_mfu.set_title("model FLOPs utilisation (PaLM convention)")
        pct = Series(metrics.mfu.steps, [100 * v for v in metrics.mfu.values])
        ax_mfu.plot(pct.steps, pct.values, color="C4", label="MFU")
        _median_line(ax_mfu, pct, lambda v: f"{v:.1f}%")
        ax_mfu.set_xlabel("step")
        ax_mfu.set_ylabel("MFU (%)")
        ax_mfu.set_ylim(0, 1.15 * max(pct.values))
        _mark_resumes(ax_mfu, metrics)
        ax_mfu.legend(loc="lower right")
    elif len(metrics.step_time_s):  # no peak FLOP/s known (CPU, unknown GPU): step time instead
        ax_mfu.set_gid("step_time")
        ax_mfu.set_title("step time (no MFU: peak FLOP/s unknown; set train.peak_flops)")
        ax_mfu.plot(metrics.step_time_s.steps, metrics.step_time_s.values, color="C4", label="step time")
        _median_line(ax_mfu, metrics.step_time_s, lambda v: f"{v:.3f} s")
        ax_mfu.set_xlabel("step")
        ax_mfu.set_ylabel("seconds / optimizer step")
        ax_mfu.set_ylim(0, 1.15 * max(metrics.step_time_s.values))
        _mark_resumes(ax_mfu, metrics)
        ax_mfu.legend(loc="lower right")
    else:
        _empty(ax_mfu, "model FLOPs utilisation", "no MFU logged: the device's peak FLOP/s is unknown")

    if len(metrics.grad_norm) or len(metrics.lr):
        ax_opt.set_title("gradient norm and learning rate")
        if len(metrics.grad_norm):
            ax_opt.plot(metrics.grad_norm.steps, metrics.grad_norm.values, color="C5", label="grad norm")
        ax_opt.set_xlabel("step")
        ax_opt.set_ylabel("global gradient norm (before clipping)")
        ax_lr = ax_opt.twinx()
        ax_lr.set_gid("lr")
        if len(metrics.lr):
            ax_lr.plot(metrics.lr.steps, metrics.lr.values, color="0.3", linestyle="--", label="lr")
        ax_lr.set_ylabel("learning rate")
        ax_lr.yaxis.set_major_formatter(_formatter(lambda v: f"{v:.1e}"))
        ax_lr.set_ylim(bottom=0)
        handles = ax_opt.get_legend_handles_labels()[0] + ax_lr.get_legend_handles_labels()[0]
        ax_lr.legend(handles=handles, loc="center right", framealpha=0.9)
    else:
        _empty(ax_opt, "gradient norm and learning rate", "not logged")
    return fig


def summary(metrics: RunMetrics) -> list[str]:
    """Plain-text lines to print next to the figure."""
    lines = [f"branched off {a['checkpoint']} (step {a['step']})" for a in metrics.lineage[-1:]]
    if len(metrics.loss):
        lines.append(f"train loss: {metrics.loss.values[0]:.4f} → {metrics.loss.values[-1]:.4f} "
                     f"(step {metrics.loss.steps[-1]})")  # fmt: skip
    if len(metrics.valid_loss):
        best = min(range(len(metrics.valid_loss)), key=lambda i: metrics.valid_loss.values[i])
        lines.append(
            f"valid loss: last {metrics.valid_loss.values[-1]:.4f}, best {metrics.valid_loss.values[best]:.4f} "
            f"(step {metrics.valid_loss.steps[best]})"
        )
    for name, s in sorted(metrics.downstream.items()):  # data.downstream: task/acc, task/acc_norm
        best = max(range(len(s)), key=lambda i: s.values[i])
        lines.append(
            f"downstream {name}: {s.values[-1]:.4f} at step {s.steps[-1]} (best {s.values[best]:.4f} at step {s.steps[best]})"
        )
    if len(metrics.tokens_per_s):
        steady = metrics.tokens_per_s.values[1:] or metrics.tokens_per_s.values
        lines.append(
            f"throughput: median {statistics.median(steady):,.0f} tokens/s (after the first interval)"
        )
    if len(metrics.mfu):
        steady = metrics.mfu.values[1:] or metrics.mfu.values
        lines.append(f"MFU: median {100 * statistics.median(steady):.1f}%")
    if len(metrics.data_wait_frac):
        steady = metrics.data_wait_frac.values[1:] or metrics.data_wait_frac.values
        lines.append(
            f"waiting for data: median {100 * statistics.median(steady):.1f}% of step time (slowest rank)"
        )
    if len(metrics.peak_reserved_gib):
        lines.append(
            f"device memory: peak {max(metrics.peak_reserved_gib.values):.1f} GiB reserved (fullest rank)"
        )
    if len(metrics.alloc_retries) and metrics.alloc_retries.values[-1]:
        lines.append(
            f"cudaMalloc retries: {metrics.alloc_retries.values[-1]:.0f} by step {metrics.alloc_retries.steps[-1]}, "
            "counted since the last (re)start (the allocator freed its cache to fit: near the memory "
            "limit, each costs a stall)"
        )
    if len(metrics.slowest_forward_ratio):
        lines.append(_stragglers(metrics))
    skipped = skip_steps(metrics)
    if skipped:
        shown = ", ".join(map(str, skipped[:10])) + (", …" if len(skipped) > 10 else "")
        lines.append(
            f"updates skipped on a loss or gradient-norm spike: {metrics.skipped_steps.values[-1]:.0f}, "
            f"in the log intervals ending at step(s) {shown}"
        )
    layers = summary_line(metrics.layers)
    if layers:
        lines.append(layers)
    changes = batch_changes(metrics)
    if changes:
        shown = ", ".join(f"{a} → {b} by step {step}" for step, a, b in changes)
        lines.append(f"global batch: {shown} (train.batch_ramp, or a forced resume)")
    if metrics.resumes:
        lines.append(f"resumed at step(s) {', '.join(map(str, metrics.resumes))}")
    return lines


def _stragglers(metrics: RunMetrics) -> str:
    """Which rank was slowest most often, and how far behind the others it fell at worst."""
    ranks = [int(r) for r in metrics.slowest_rank.values]
    often = max(set(ranks), key=ranks.count)
    ratios = metrics.slowest_forward_ratio
    worst = max(range(len(ratios)), key=lambda i: ratios.values[i])
    return (
        f"slowest rank: rank {often} in {ranks.count(often)} of {len(ranks)} log lines; the slowest rank's "
        f"forwards took {statistics.median(ratios.values):.2f}x the other ranks' median (median over lines), "
        f"{ratios.values[worst]:.2f}x at worst (step {ratios.steps[worst]}, rank {ranks[worst]})"
    )


def write_report(
    run_dir: str | Path, output: str | Path | None = None, dpi: int = 110, metrics: RunMetrics | None = None
) -> Path:
    """Render RUN_DIR's metrics.jsonl to a PNG (default RUN_DIR/report.png); returns its path."""
    from ds_train.report.series import load_run_metrics

    run_dir = Path(run_dir)
    metrics = metrics or load_run_metrics(run_dir)
    fig = build_figure(metrics, title=f"{run_dir.resolve().name}: {run_dir}")
    out = Path(output) if output else run_dir / "report.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    agg_pyplot().close(fig)
    return out
