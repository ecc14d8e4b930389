"""The per-layer norms of a run (train.per_layer_norms_every) as heatmaps: one row per layer, one
column per measured step, a log colour scale. A layer whose gradient norm leaves its row's usual
range stands out, and the column says when.

The gradient norms of the layers are compared as each one's ratio to its own median over the
run, which is what the summary line reports: in absolute terms, the embeddings and the head
usually dwarf every block.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path

from ds_train.report.agg_pyplot import agg_pyplot

FIELDS = ("layer_grad_norm", "layer_weight_norm")


@dataclass
class LayerNormSeries:
    steps: list[int] = field(default_factory=list)
    groups: list[str] = field(default_factory=list)  # in model order
    grad: list[list[float]] = field(default_factory=list)  # [group][step]; NaN where not measured
    weight: list[list[float]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.steps)


def layer_norm_series(train: dict[int, dict]) -> LayerNormSeries:
    """From the train records by step (the resumed lineage's, as series.py keeps them)."""
    out = LayerNormSeries()
    measured = [s for s in sorted(train) if FIELDS[0] in train[s]]
    for s in measured:
        for group in train[s][FIELDS[0]]:
            if group not in out.groups:
                out.groups.append(group)
    out.steps = measured
    nan = float("nan")
    for key, rows in zip(FIELDS, (out.grad, out.weight)):
        rows.extend([[float(train[s].get(key, {}).get(g, nan)) for s in measured] for g in out.groups])
    return out


def largest_excursion(series: LayerNormSeries) -> tuple[str, int, float] | None:
    """(group, step, ratio): the gradient norm furthest above its own layer's median over the run."""
    best = None
    for group, row in zip(series.groups, series.grad):
        finite = [v for v in row if v == v]
        if not finite:
            continue
        median = statistics.median(finite)
        for step, v in zip(series.steps, row):
            if v == v and median > 0 and (best is None or v / median > best[2]):
                best = (group, step, v / median)
    return best


def summary_line(series: LayerNormSeries) -> str | None:
    found = largest_excursion(series)
    if found is None:
        return None
    group, step, ratio = found
    return (
        f"layer norms: {len(series.groups)} layers at {len(series)} steps; largest gradient norm against its "
        f"layer's median: {group}, {ratio:.1f}x at step {step}"
    )


def write_layer_figure(series: LayerNormSeries, out: Path, title: str, dpi: int = 110) -> Path:
    """Two heatmaps (gradient norms, weight norms) to `out`."""
    plt = agg_pyplot()
    import numpy as np
    from matplotlib.colors import LogNorm

    height = max(4.0, 0.22 * len(series.groups) + 2)
    fig, axes = plt.subplots(1, 2, figsize=(15, height), constrained_layout=True)
    fig.suptitle(title, fontsize=13)
    panels = (("grad", series.grad, "gradient norm"), ("weight", series.weight, "fp32 weight norm"))
    for ax, (gid, rows, what) in zip(axes, panels):
        data = np.ma.masked_invalid(np.asarray(rows, dtype=float))
        data = np.ma.masked_less_equal(data, 0)  # a log scale: a zero (frozen, no gradient) is blank
        ax.set_gid(gid)
        ax.set_title(f"{what} per layer")
        if data.count():
            image = ax.imshow(
                data,
                aspect="auto",
                interpolation="nearest",
                cmap="viridis",
                norm=LogNorm(data.min(), data.max()),
            )
            fig.colorbar(image, ax=ax, fraction=0.05)
        ticks = np.linspace(0, len(series) - 1, min(len(series), 8)).round().astype(int)
        ax.set_xticks(ticks, [str(series.steps[i]) for i in ticks])
        ax.set_yticks(range(len(series.groups)), series.groups, fontsize=7)
        ax.set_xlabel("step")
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
    return out
