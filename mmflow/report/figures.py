"""The paper's figures from cell results: per-layer mean relative change with a 95% band.

Figures are built on matplotlib's Agg canvas directly (no pyplot state), so they are safe to draw
in any process, a Ray actor included.
"""

from __future__ import annotations

import io
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from mmflow.knockout.spec import NAMED_KNOCKOUTS
from mmflow.report.cells import CellData, knockout_order

Z95 = 1.96
VALUE_COLUMN = "rel_change_pct"
Y_LABEL = "Relative change in answer probability (%)"
BAND_NOTE = "band: 95% CI of the mean"
PALETTE = [f"C{i}" for i in range(10)]
LINESTYLES = ["-", "--", ":", "-."]  # one per window width, when a figure has several


def curve_stats(results: pd.DataFrame, column: str = VALUE_COLUMN) -> pd.DataFrame:
    """Per layer: n, mean, sem and the 95% interval (mean ± 1.96·sem) of `column` over samples."""
    grouped = results.groupby("layer")[column]
    stats = grouped.agg(n="count", mean="mean", std="std").reset_index()
    stats["layer"] = stats["layer"].astype(int)
    stats["sem"] = stats["std"] / np.sqrt(stats["n"])
    stats["ci_low"] = stats["mean"] - Z95 * stats["sem"]
    stats["ci_high"] = stats["mean"] + Z95 * stats["sem"]
    return stats.drop(columns="std")


def new_figure(width: float = 7.0, height: float = 4.2) -> tuple[Figure, object]:
    """A figure on the Agg canvas and its single axis."""
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure, figure.add_subplot()


def knockout_color(name: str) -> str:
    """A fixed colour per block type, so every figure shows a knockout in the same colour."""
    names = list(NAMED_KNOCKOUTS)
    index = names.index(name) if name in names else len(names) + sum(map(ord, name))
    return PALETTE[index % len(PALETTE)]


def _band(ax, x: np.ndarray, stats: pd.DataFrame, color: str, label: str, style: str = "-") -> None:
    ax.plot(x, stats["mean"], style, marker="o", ms=3, lw=1.6, color=color, label=label, clip_on=False)
    ax.fill_between(x, stats["ci_low"], stats["ci_high"], color=color, alpha=0.18, lw=0)


def _style(window: int | None, windows: set) -> str:
    return LINESTYLES[sorted(windows, key=lambda w: w or 0).index(window) % len(LINESTYLES)]


def _n_text(cells: Sequence[CellData]) -> str:
    counts = sorted({int(cell.results.groupby("layer").size().max()) for cell in cells if len(cell.results)})
    if not counts:
        return "n = 0"
    return f"n = {counts[0]}" if len(counts) == 1 else f"n = {counts[0]}–{counts[-1]}"


def _finish_axes(ax, title: str, xlabel: str, legend_title: str) -> None:
    ax.axhline(0.0, color="0.4", lw=0.8, ls="--", zorder=0)
    ax.set_title(title, fontsize=11)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(Y_LABEL)
    ax.grid(alpha=0.25)
    legend = ax.legend(loc="best", fontsize="small", framealpha=0.9, title=f"{legend_title} ({BAND_NOTE})")
    legend.get_title().set_fontsize("small")


def plot_model_task(cells: Sequence[CellData]) -> Figure:
    """One model and task: relative change (%) against centre layer, one line per knockout."""
    cells = [c for c in cells if c.analysis == "knockout"]
    first = cells[0]
    n_layers = max(c.n_layers for c in cells)
    windows = {c.window for c in cells}
    figure, ax = new_figure()
    for cell in cells:
        stats = curve_stats(cell.results)
        label = cell.label if len(windows) == 1 else f"{cell.label} (k={cell.window})"
        color = knockout_color(cell.knockout)
        _band(ax, stats["layer"].to_numpy(), stats, color, label, _style(cell.window, windows))
    window = f"window k = {first.window}, " if len(windows) == 1 else ""
    title = f"{first.model} — {first.task}: attention knockout ({window}{_n_text(cells)})"
    xlabel = f"Centre layer of the knocked-out window (0–{n_layers - 1} of {n_layers} layers)"
    _finish_axes(ax, title, xlabel, "Knockout")
    ax.set_xlim(0, n_layers - 1)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return figure


def plot_model_overview(cells: Sequence[CellData], columns: int = 3) -> Figure:
    """One model at one window: a panel per task (shared y axis), one line per knockout."""
    cells = [c for c in cells if c.analysis == "knockout" and len(c.results)]
    first = cells[0]
    tasks = sorted({c.task for c in cells})
    n_layers = max(c.n_layers for c in cells)
    rows = -(-len(tasks) // columns)
    figure = Figure(figsize=(4.0 * columns, 3.1 * rows + 0.6), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, columns, sharex=True, sharey=True, squeeze=False).flatten()
    for ax, task in zip(axes, tasks, strict=False):
        group = sorted((c for c in cells if c.task == task), key=lambda c: knockout_order(c.knockout))
        for cell in group:
            stats = curve_stats(cell.results)
            _band(ax, stats["layer"].to_numpy(), stats, knockout_color(cell.knockout), cell.label)
        ax.axhline(0.0, color="0.4", lw=0.8, ls="--", zorder=0)
        ax.set_title(f"{task} ({_n_text(group)})", fontsize=10)
        ax.grid(alpha=0.25)
        ax.set_xlim(0, n_layers - 1)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in axes[len(tasks) :]:
        ax.set_visible(False)
    figure.supxlabel(f"Centre layer of the knocked-out window (0–{n_layers - 1} of {n_layers} layers)")
    figure.supylabel(Y_LABEL)
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(
        handles,
        labels,
        loc="outside upper center",
        ncols=len(labels),
        fontsize="small",
        title=f"{first.model}: attention knockout, window k = {first.window} ({BAND_NOTE})",
    )
    return figure


def plot_cross_model(cells: Sequence[CellData]) -> Figure:
    """One task and knockout: every model's curve on the relative-depth axis (layer / L)."""
    cells = [c for c in cells if c.analysis == "knockout"]
    first = cells[0]
    windows = {c.window for c in cells}
    models = sorted({c.model for c in cells})
    figure, ax = new_figure()
    for cell in cells:
        stats = curve_stats(cell.results)
        extra = f", k = {cell.window}" if len(windows) > 1 else ""
        label = f"{cell.model} (L = {cell.n_layers}{extra})"
        color = PALETTE[models.index(cell.model) % len(PALETTE)]
        x = stats["layer"].to_numpy() / cell.n_layers
        _band(ax, x, stats, color, label, _style(cell.window, windows))
    window = f"window k = {first.window}, " if len(windows) == 1 else ""
    title = f"{first.label} — {first.task}: across models ({window}{_n_text(cells)})"
    _finish_axes(ax, title, "Relative depth of the window centre (layer / number of layers)", "Model")
    ax.set_xlim(0.0, 1.0)
    return figure


def plot_answer_tracking_cell(cell: CellData) -> Figure | None:
    """The answer-tracking figure via `mmflow.analyses.answer_tracking.plot_answer_tracking`, if present."""
    try:
        from mmflow.analyses.answer_tracking import plot_answer_tracking
    except ImportError:
        return None
    figure, ax = new_figure()
    lens = cell.config.get("lens")
    title = f"{cell.model} — {cell.task}: answer tracking" + (f" (lens = {lens})" if lens else "")
    plot_answer_tracking(cell.results, ax=ax, title=title)
    return figure


def plot_cell(cell: CellData) -> Figure | None:
    """The figure of one cell (what W&B shows for it)."""
    if cell.analysis == "knockout" and cell.heads == "each":
        from mmflow.report.patching import plot_head_heatmap

        return plot_head_heatmap(cell) if len(cell.results) else None
    if cell.analysis == "knockout":
        return plot_model_task([cell]) if len(cell.results) else None
    if cell.analysis == "answer_tracking":
        return plot_answer_tracking_cell(cell)
    if cell.analysis == "patching" and len(cell.results):
        from mmflow.report.patching import plot_necessity_sufficiency

        return plot_necessity_sufficiency([], [cell])
    return None


def slug(*parts: object) -> str:
    """A file-name-safe stem from `parts`."""
    return "__".join(re.sub(r"[^A-Za-z0-9._-]+", "-", str(p)).strip("-") for p in parts)


def save_figure(figure: Figure, out_dir: Path, stem: str) -> dict[str, Path]:
    """Write `stem.png` (150 dpi) and `stem.pdf` into `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"png": out_dir / f"{stem}.png", "pdf": out_dir / f"{stem}.pdf"}
    figure.savefig(paths["png"], dpi=150)
    figure.savefig(paths["pdf"])
    return paths


def png_bytes(figure: Figure, dpi: int = 110) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()
