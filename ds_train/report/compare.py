"""`ds-train report RUN_A RUN_B ...`: several runs on one figure, and where each stands.

For ablations and for cooldowns branched off one run (`run.start_from`): the training loss by step
and by tokens (runs with other batch sizes or sequence lengths compare by tokens), the validation
losses, the throughput, and each figure at the last step that every run logged, the one fair
point of comparison when some runs went further than others.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import TYPE_CHECKING

from ds_train.report.agg_pyplot import agg_pyplot, panel_grid
from ds_train.report.series import RunMetrics, Series, loss_with_ancestors

if TYPE_CHECKING:
    from matplotlib.figure import Figure

PANELS = ("loss_by_step", "valid_loss", "loss_by_tokens", "throughput")


def run_labels(run_dirs: list[Path]) -> list[str]:
    """Each run's directory name, with as many of its parents as it takes to tell it from the
    others; ConfigError for a directory given twice (one of them would be dropped)."""
    from ds_train.config import ConfigError

    paths = [p.resolve() for p in run_dirs]
    if len(set(paths)) != len(paths):
        raise ConfigError("ds-train report: a run directory is given twice")
    depth = [1] * len(paths)
    while True:
        labels = ["/".join(p.parts[-d:]) for p, d in zip(paths, depth)]
        clashing = [i for i, label in enumerate(labels) if labels.count(label) > 1]
        if not clashing:
            return labels
        for i in clashing:
            depth[i] += 1


def build_comparison(runs: dict[str, RunMetrics], title: str) -> Figure:
    """The comparison figure (2×2 panels, `gid`s named as in PANELS), not yet saved."""
    fig, axes = panel_grid(title, PANELS)
    ax_step, ax_valid, ax_tokens, ax_tps = axes.flat
    shown = {m.run_dir for m in runs.values()}
    for k, (name, m) in enumerate(runs.items()):
        color = f"C{k % 10}"
        # the run it branched off, up to the branch point, unless that run is drawn itself
        if len(m.before_branch) and m.lineage[-1]["run_dir"] not in shown:
            ax_step.plot(m.before_branch.steps, m.before_branch.values, "--", color=color, linewidth=0.8)
        ax_step.plot(m.loss.steps, m.loss.values, color=color, linewidth=1.3, label=name)
        if len(m.valid_loss):
            ax_valid.plot(
                m.valid_loss.steps, m.valid_loss.values, "o-", color=color, markersize=4, label=name
            )
        if len(m.tokens):
            by_tokens = _at_steps(m.loss, m.tokens)
            ax_tokens.plot(by_tokens.steps, by_tokens.values, color=color, linewidth=1.3, label=name)
        if len(m.tokens_per_s):
            ax_tps.plot(m.tokens_per_s.steps, m.tokens_per_s.values, color=color, label=name)
    ax_step.set_title("training loss (dashed: the run a branch was taken from)")
    ax_step.set_xlabel("step")
    ax_step.set_ylabel("cross-entropy (nats/token)")
    ax_valid.set_title("validation loss")
    ax_valid.set_xlabel("step")
    ax_tokens.set_title("training loss by tokens trained")
    ax_tokens.set_xlabel("tokens")
    ax_tps.set_title("throughput")
    ax_tps.set_xlabel("step")
    ax_tps.set_ylabel("tokens / s")
    if ax_tps.lines:
        ax_tps.set_ylim(bottom=0)
    for ax in axes.flat:
        if ax.lines:
            ax.legend(loc="upper right", fontsize=8)
        else:
            ax.text(0.5, 0.5, "not logged by these runs", ha="center", va="center",
                    transform=ax.transAxes, color="0.4")  # fmt: skip
    return fig


def _at_steps(values: Series, x: Series) -> Series:
    """`values` against another series' values at the same steps (loss against tokens)."""
    at = dict(zip(x.steps, x.values))
    kept = [(at[s], v) for s, v in zip(values.steps, values.values) if s in at]
    return Series([a for a, _ in kept], [v for _, v in kept])


def comparison_lines(runs: dict[str, RunMetrics]) -> list[str]:
    """A table of each run's last figures, then each run's losses at the last step all of them
    logged (and evaluated), where they can be compared."""
    width = max(len(n) for n in runs)
    lines = [
        f"{'run':<{width}}  {'steps':>7}  {'train loss':>10}  {'valid loss (best @ step)':>26}  {'tokens/s':>10}"
    ]
    for name, m in runs.items():
        last = f"{m.loss.values[-1]:.4f}" if len(m.loss) else "-"
        steps = str(m.loss.steps[-1]) if len(m.loss) else "-"
        valid = "-"
        if len(m.valid_loss):
            best = min(range(len(m.valid_loss)), key=lambda i: m.valid_loss.values[i])
            valid = f"{m.valid_loss.values[-1]:.4f} ({m.valid_loss.values[best]:.4f} @ {m.valid_loss.steps[best]})"
        steady = m.tokens_per_s.values[1:] or m.tokens_per_s.values
        tps = f"{statistics.median(steady):,.0f}" if steady else "-"
        lines.append(f"{name:<{width}}  {steps:>7}  {last:>10}  {valid:>26}  {tps:>10}")
    figures = {"train loss": {n: loss_with_ancestors(m) for n, m in runs.items()},
               "valid loss": {n: m.valid_loss for n, m in runs.items()}}  # fmt: skip
    tasks = set.intersection(*(set(m.downstream) for m in runs.values()))  # data.downstream's, in every run
    for key in sorted(tasks):
        figures[f"downstream {key}"] = {n: m.downstream[key] for n, m in runs.items()}
    for what, series in figures.items():
        common = set.intersection(*(set(s.steps) for s in series.values()))
        if common:
            step = max(common)
            shown = ", ".join(f"{n} {dict(zip(s.steps, s.values))[step]:.4f}" for n, s in series.items())
            lines.append(f"{what} at step {step}, the last every run logged: {shown}")
    return lines


def write_comparison(runs: dict[str, RunMetrics], output: str | Path | None, dpi: int = 110) -> Path:
    """Render the comparison to `output` (default: compare.png in the current directory)."""
    fig = build_comparison(runs, title=f"{len(runs)} runs: {', '.join(runs)}")
    out = Path(output) if output else Path("compare.png")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    agg_pyplot().close(fig)
    return out
