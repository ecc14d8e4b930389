"""matplotlib's pyplot on the Agg backend: figures render to files with no display (cluster nodes,
CI). Imported when a figure is drawn, so `ds-train` starts without matplotlib."""

from __future__ import annotations


def agg_pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt
