"""The paper's knockout figures: per-layer mean relative change of the answer probability, 95% band.

They take finished cells (`mmflow.storage.cell_data.CellData`: `results`, `model`, `task`, `n_layers` and the
knockout analysis's labels: `label`, `variant`, `window`) and read every curve from
`KnockoutAnalysis.curve_table`. Cells drawn together that differ in a key the figure does not vary
(data source, n_samples, engine, ...) get it in their legend label (`plots.distinguishing_notes`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from mmflow.analyses.plots import (
    BAND_NOTE,
    LINESTYLES,
    PALETTE,
    band,
    distinguishing_notes,
    new_figure,
    new_grid,
    noise_band,
    noise_floor_of,
)
from mmflow.knockout.spec import NAMED_KNOCKOUTS

Y_LABEL = "Relative change in answer probability (%)"


def knockout_order(name: str) -> tuple[int, str]:
    """Sort key: the paper's block types in their usual order, then custom ones by name."""
    names = list(NAMED_KNOCKOUTS)
    return (names.index(name), name) if name in names else (len(names), name)


def knockout_color(name: str) -> str:
    """A fixed colour per block type, so every figure shows a knockout in the same colour."""
    names = list(NAMED_KNOCKOUTS)
    index = names.index(name) if name in names else len(names) + sum(map(ord, name))
    return PALETTE[index % len(PALETTE)]


def cell_curve(cell: Any):
    """The cell's relative-change curve (layer, n, mean, sem, ci_low, ci_high) from its analysis."""
    table = cell.analysis.curve_table(cell.results)
    return table[table["value"] == "rel_change_pct"].reset_index(drop=True)


def _style(window: int | None, windows: set, note: str = "", notes: Sequence[str] = ("",)) -> str:
    """One line style per (window, note) pair: the windows' styles when no note tells cells apart."""
    pairs = sorted({(w or 0, n) for w in windows for n in notes})
    return LINESTYLES[pairs.index((window or 0, note)) % len(LINESTYLES)]


def _n_text(cells: Sequence[Any]) -> str:
    counts = sorted({int(cell.results.groupby("layer").size().max()) for cell in cells if len(cell.results)})
    if not counts:
        return "n = 0"
    return f"n = {counts[0]}" if len(counts) == 1 else f"n = {counts[0]}–{counts[-1]}"


LEGEND_INSIDE = 8  # more entries than this go beside the axes
LEGEND_ROWS = 18


def _finish_axes(ax, title: str, xlabel: str, legend_title: str) -> None:
    ax.axhline(0.0, color="0.4", lw=0.8, ls="--", zorder=0)
    ax.set_title(title, fontsize=11)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(Y_LABEL)
    ax.grid(alpha=0.25)
    title = f"{legend_title} ({BAND_NOTE})"
    handles, labels = ax.get_legend_handles_labels()
    if len(labels) <= LEGEND_INSIDE:
        legend = ax.legend(loc="best", fontsize="small", framealpha=0.9, title=title)
    else:  # ten models or more: beside the axes, in columns of at most LEGEND_ROWS, the figure widened
        columns = -(-len(labels) // LEGEND_ROWS)
        figure = ax.get_figure()
        figure.set_figwidth(figure.get_figwidth() + 3.2 * columns)
        legend = figure.legend(
            handles, labels, loc="outside right upper", ncols=columns, fontsize="x-small", title=title
        )
    legend.get_title().set_fontsize("small")


def plot_model_task(cells: Sequence[Any]) -> Figure:
    """One model and task: relative change (%) against centre layer, one line per knockout."""
    first = cells[0]
    n_layers = max(c.n_layers for c in cells)
    windows = {c.window for c in cells}
    notes = distinguishing_notes(cells, ("knockout", "window"))
    figure, ax = new_figure()
    for cell, note in zip(cells, notes, strict=True):
        stats = cell_curve(cell)
        label = (cell.label if len(windows) == 1 else f"{cell.label} (k={cell.window})") + note
        color = knockout_color(cell.variant)
        band(ax, stats["layer"].to_numpy(), stats, color, label, _style(cell.window, windows, note, notes))
    noise_band(ax, noise_floor_of(cells))
    window = f"window k = {first.window}, " if len(windows) == 1 else ""
    title = f"{first.model_title} — {first.task}: attention knockout ({window}{_n_text(cells)})"
    xlabel = f"Centre layer of the knocked-out window (0–{n_layers - 1} of {n_layers} layers)"
    _finish_axes(ax, title, xlabel, "Knockout")
    ax.set_xlim(0, n_layers - 1)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return figure


def plot_model_overview(cells: Sequence[Any], columns: int = 3) -> Figure:
    """One model at one window: a panel per task (shared y axis), one line per knockout."""
    cells = [c for c in cells if len(c.results)]
    first = cells[0]
    tasks = sorted({c.task for c in cells})
    n_layers = max(c.n_layers for c in cells)
    rows = -(-len(tasks) // columns)
    notes = dict(zip(map(id, cells), distinguishing_notes(cells, ("knockout", "task")), strict=True))
    figure, axes = new_grid(rows, columns, 4.0 * columns, 3.1 * rows + 0.6)
    for ax, task in zip(axes, tasks, strict=False):
        task_cells = sorted((c for c in cells if c.task == task), key=lambda c: knockout_order(c.variant))
        for cell in task_cells:
            stats = cell_curve(cell)
            note = notes[id(cell)]
            style = _style(None, {None}, note, list(notes.values()))
            band(ax, stats["layer"].to_numpy(), stats, knockout_color(cell.variant), cell.label + note, style)
        ax.axhline(0.0, color="0.4", lw=0.8, ls="--", zorder=0)
        noise_band(ax, noise_floor_of(cells))  # one floor (the largest) for every panel: one legend entry
        ax.set_title(f"{task} ({_n_text(task_cells)})", fontsize=10)
        ax.grid(alpha=0.25)
        ax.set_xlim(0, n_layers - 1)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in axes[len(tasks) :]:
        ax.set_visible(False)
    figure.supxlabel(f"Centre layer of the knocked-out window (0–{n_layers - 1} of {n_layers} layers)")
    figure.supylabel(Y_LABEL)
    legend = {}  # every label of every panel, once (a knockout may be missing from the first task)
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            legend.setdefault(label, handle)
    handles, labels = list(legend.values()), list(legend)
    figure.legend(
        handles,
        labels,
        loc="outside upper center",
        ncols=min(len(labels), 4),
        fontsize="small",
        title=f"{first.model_title}: attention knockout, window k = {first.window} ({BAND_NOTE})",
    )
    return figure


def plot_cross_model(cells: Sequence[Any]) -> Figure:
    """One task and knockout: every model's curve on the relative-depth axis (layer / L)."""
    first = cells[0]
    windows = {c.window for c in cells}
    models = sorted({c.model for c in cells})
    notes = distinguishing_notes(cells, ("model", "window"))
    figure, ax = new_figure()
    for cell, note in zip(cells, notes, strict=True):
        stats = cell_curve(cell)
        extra = f", k = {cell.window}" if len(windows) > 1 else ""
        label = f"{cell.model_legend} (L = {cell.n_layers}{extra}){note}"
        color = PALETTE[models.index(cell.model) % len(PALETTE)]
        x = stats["layer"].to_numpy() / cell.n_layers
        band(ax, np.asarray(x), stats, color, label, _style(cell.window, windows, note, notes))
    noise_band(ax, noise_floor_of(cells))
    window = f"window k = {first.window}, " if len(windows) == 1 else ""
    title = f"{first.label} — {first.task}: across models ({window}{_n_text(cells)})"
    _finish_axes(ax, title, "Relative depth of the window centre (layer / number of layers)", "Model")
    ax.set_xlim(0.0, 1.0)
    return figure
