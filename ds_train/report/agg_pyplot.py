"""matplotlib's pyplot on the Agg backend: figures render to files with no display (cluster nodes,
CI). Imported when a figure is drawn, so `ds-train` starts without matplotlib."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    from matplotlib.figure import Figure


def agg_pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def panel_grid(title: str, gids: tuple[str, ...]) -> tuple[Figure, np.ndarray]:
    """A titled 2×2 figure whose axes carry `gids` (the panels' names, for tests to find them)."""
    fig, axes = agg_pyplot().subplots(2, 2, figsize=(13, 8.5), constrained_layout=True)
    fig.suptitle(title, fontsize=13)
    for ax, gid in zip(axes.flat, gids, strict=True):
        ax.set_gid(gid)
        ax.grid(True, alpha=0.3)
    return fig, axes
