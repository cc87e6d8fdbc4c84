"""Figure primitives shared by the analyses' figures, on matplotlib's Agg canvas (no pyplot state),
so figures are safe to draw in any process, a Ray actor included."""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

PALETTE = [f"C{i}" for i in range(10)]
LINESTYLES = ["-", "--", ":", "-."]  # one per window width, when a figure has several
BAND_NOTE = "band: 95% CI of the mean"


def new_figure(width: float = 7.0, height: float = 4.2) -> tuple[Figure, object]:
    """A figure on the Agg canvas and its single axis."""
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure, figure.add_subplot()


def new_grid(rows: int, columns: int, width: float, height: float) -> tuple[Figure, np.ndarray]:
    """A figure of rows × columns panels sharing both axes, and its flattened axes."""
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure, figure.subplots(rows, columns, sharex=True, sharey=True, squeeze=False).flatten()


def band(ax, x: np.ndarray, stats: pd.DataFrame, color: str, label: str, style: str = "-") -> None:
    """The curve `stats["mean"]` against `x` with its 95% band (`ci_low`..`ci_high`)."""
    ax.plot(x, stats["mean"], style, marker="o", ms=3, lw=1.6, color=color, label=label, clip_on=False)
    ax.fill_between(x, stats["ci_low"], stats["ci_high"], color=color, alpha=0.18, lw=0)
