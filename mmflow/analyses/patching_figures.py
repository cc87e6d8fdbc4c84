"""Figures of issue 18: patching curves beside the knockout curves, and layer x head heat maps.

- `plot_necessity_sufficiency`: one model, task and window; the first panel is the knockout curves
  (relative change of p, necessity), then one panel per corruption with the recovered fraction (%)
  against centre layer, one line per restored group (sufficiency).
- `plot_head_heatmap`: a knockout cell with `knockout.heads: each`; the mean relative change (%) per
  centre layer and head.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from mmflow.analyses.curves import curve_stats, half_width
from mmflow.analyses.knockout_figures import Y_LABEL, cell_curve, knockout_color, knockout_order
from mmflow.analyses.plots import (
    BAND_NOTE,
    LINESTYLES,
    PALETTE,
    distinguishing_notes,
    new_figure,
    noise_band,
    noise_floor_of,
)
from mmflow.analyses.plots import band as _band

CellData = Any  # a finished cell (`mmflow.storage.cell_data.CellData`)

RECOVERED_LABEL = "Recovered fraction of p(answer) (%)"
GROUP_ORDER = ("image", "object", "nonobject", "question", "true_option", "false_option", "last", "all")


def patching_curves(results: pd.DataFrame) -> pd.DataFrame:
    """Per restored group and centre layer: n, mean, sem and 95% interval of recovered_frac in %."""
    frames = []
    for group, part in results.groupby("group", sort=False):
        stats = curve_stats(part.assign(recovered_pct=part["recovered_frac"] * 100.0), "recovered_pct")
        frames.append(stats.assign(group=group))
    columns = ["group", "layer", "n", "mean", "sem", "ci_low", "ci_high"]
    return pd.concat(frames, ignore_index=True)[columns] if frames else pd.DataFrame(columns=columns)


def _group_key(name: str) -> tuple[int, str]:
    first = name.split("+")[0]
    return (GROUP_ORDER.index(first) if first in GROUP_ORDER else len(GROUP_ORDER), name)


def draw_patching(ax, cell: CellData, note: str = "") -> None:
    """Recovered fraction (%) against centre layer on `ax`, one line per restored group; `note` (what
    tells this panel's cell from the others beside it) ends the title."""
    table = cell.analysis.curve_table(cell.results)  # labels of the restored groups, from the analysis
    labels = {
        value.removeprefix("recovered_pct/"): label
        for value, label in zip(table["value"], table["label"], strict=True)
    }
    curves = patching_curves(cell.results)
    for index, group in enumerate(sorted(curves["group"].unique(), key=_group_key)):
        stats = curves[curves["group"] == group]
        _band(ax, stats["layer"].to_numpy(), stats, PALETTE[index % len(PALETTE)], labels.get(group, group))
    n = int(curves.groupby("layer")["n"].max().max()) if len(curves) else 0
    ax.axhline(0.0, color="0.4", lw=0.8, ls="--", zorder=0)
    ax.axhline(100.0, color="0.4", lw=0.8, ls=":", zorder=0)
    ax.set_title(
        f"Restoring clean states, corruption = {cell.config.get('corruption')} (n = {n}){note}", fontsize=10
    )
    ax.set_ylabel(RECOVERED_LABEL)
    ax.grid(alpha=0.25)
    ax.legend(loc="best", fontsize="small", title=f"Restored group ({BAND_NOTE})", title_fontsize="small")


def draw_knockouts(ax, cells: Sequence[CellData]) -> None:
    """The knockout curves of `cells` (relative change, %) on `ax`, labelled with what tells apart
    cells of one knockout (`distinguishing_notes`)."""
    cells = sorted(cells, key=lambda c: knockout_order(c.variant))
    notes = distinguishing_notes(cells, ("knockout",))
    for cell, note in zip(cells, notes, strict=True):
        stats = cell_curve(cell)
        style = LINESTYLES[sorted(set(notes)).index(note) % len(LINESTYLES)]
        _band(ax, stats["layer"].to_numpy(), stats, knockout_color(cell.variant), cell.label + note, style)
    ax.axhline(0.0, color="0.4", lw=0.8, ls="--", zorder=0)
    noise_band(ax, noise_floor_of(cells))
    ax.set_title("Attention knockout (necessity)", fontsize=10)
    ax.set_ylabel(Y_LABEL)
    ax.grid(alpha=0.25)
    ax.legend(loc="best", fontsize="small", title=f"Knockout ({BAND_NOTE})", title_fontsize="small")


def plot_necessity_sufficiency(knockouts: Sequence[CellData], patchings: Sequence[CellData]) -> Figure:
    """Knockout curves (if any) beside one recovered-fraction panel per patching cell."""
    patchings = sorted(patchings, key=lambda c: str(c.config.get("corruption")))
    notes = dict(zip(map(id, patchings), distinguishing_notes(patchings, ("corruption",)), strict=True))
    panels = ([None] if knockouts else []) + patchings
    figure = Figure(figsize=(5.2 * len(panels), 4.0), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(panels), sharex=True, squeeze=False)[0]
    first = (list(knockouts) + list(patchings))[0]
    n_layers = max(c.n_layers for c in [*knockouts, *patchings])
    for ax, panel in zip(axes, panels, strict=True):
        if panel is None:
            draw_knockouts(ax, knockouts)
        else:
            draw_patching(ax, panel, notes[id(panel)])
        ax.set_xlim(0, n_layers - 1)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    figure.supxlabel(f"Centre layer of the window (0–{n_layers - 1} of {n_layers} layers)")
    what = "necessity (knockout) and sufficiency (patching)" if knockouts else "sufficiency (patching)"
    title = f"{first.model_title} — {first.task}: {what}, k = {first.window}"
    figure.suptitle(title, wrap=True, fontsize=11 if len(panels) > 1 else 10)
    return figure


def head_table(results: pd.DataFrame, column: str = "rel_change_pct") -> pd.DataFrame:
    """Mean of `column` over samples as a [layer x head] table."""
    return results.groupby(["layer", "head"])[column].mean().unstack("head").sort_index()


def diverging_norm(values: np.ndarray) -> Normalize:
    """A colour scale centred on 0 and symmetric (±max |value|): equal colours mean equal magnitudes,
    so a small increase never looks as strong as a large drop."""
    finite = np.abs(values[np.isfinite(values)])
    limit = max(float(finite.max()) if finite.size else 0.0, 1e-9)
    return Normalize(vmin=-limit, vmax=limit)


def plot_head_heatmap(cell: CellData) -> Figure:
    """Mean relative change (%) per centre layer (rows) and head (columns) of a per-head knockout cell."""
    table = head_table(cell.results)
    figure, ax = new_figure(width=1.2 + 0.55 * table.shape[1] + 1.5, height=1.4 + 0.35 * table.shape[0])
    values = table.to_numpy()
    norm = diverging_norm(values)
    image = ax.imshow(values, cmap="RdBu", norm=norm, aspect="auto", origin="lower")
    ax.set_xticks(range(table.shape[1]), [str(h) for h in table.columns])
    ax.set_yticks(range(table.shape[0]), [str(layer) for layer in table.index])
    ax.set_xlabel("Attention head (blocked alone)")
    ax.set_ylabel("Centre layer of the window")
    n = int(cell.results.groupby(["layer", "head"]).size().max())
    floor = noise_floor_of([cell])
    floor_text = f", noise floor ±{floor:.2g}%" if floor is not None else ""
    ax.set_title(
        f"{cell.model_title} — {cell.task}: {cell.analysis.spec.label} per head "
        f"(k = {cell.window}, n = {n}{floor_text})",
        fontsize=10,
    )
    figure.colorbar(image, ax=ax, label="Mean relative change (%)")
    for (row, col), value in np.ndenumerate(values):
        ax.text(col, row, f"{value:.2g}", ha="center", va="center", fontsize=6)
    return figure


def strongest_heads(results: pd.DataFrame, top: int = 3) -> pd.DataFrame:
    """The `top` (layer, head) cells with the most negative mean relative change, with their means."""
    means = results.groupby(["layer", "head"]).agg(
        rel_change_pct=("rel_change_pct", "mean"),
        sem=("rel_change_pct", "sem"),
        logp_change=("logp_change", "mean"),
        top1_changed=("top1_changed", "mean"),
        n=("rel_change_pct", "count"),
    )
    means["ci95"] = half_width(means["sem"], means["n"])  # NaN where n < 2
    return means.sort_values("rel_change_pct").head(top).reset_index()


def patching_sections(cells: Sequence[CellData]) -> list[tuple[str, list]]:
    """Report sections: knockout (all heads) beside patching per (model, task, window)."""
    from mmflow.analyses.base import FigureSpec

    patchings = [c for c in cells if c.kind == "patching" and len(c.results)]
    entries = []
    for key in sorted({(c.model, c.task, c.window) for c in patchings}):
        chosen = [c for c in patchings if (c.model, c.task, c.window) == key]
        knockouts = [
            c
            for c in cells
            if c.kind == "knockout"
            and c.analysis.heads is None
            and len(c.results)
            and (c.model, c.task, c.window) == key
        ]
        caption = f"{key[0]} — {key[1]} (k = {key[2]}): knockout and patching"
        stem = "__".join(("patching", *map(str, key)))
        entries.append(FigureSpec(stem, caption, plot_necessity_sufficiency(knockouts, chosen)))
    return [("Necessity (knockout) and sufficiency (patching)", entries)] if entries else []


def head_sections(cells: Sequence[CellData]) -> list[tuple[str, list]]:
    """Report sections: a layer x head heat map per knockout cell with `knockout.heads: each`."""
    from mmflow.analyses.base import FigureSpec

    entries = []
    for cell in cells:
        caption = f"{cell.model_title} — {cell.task}: {cell.label} (k = {cell.window})"
        stem = "__".join(("heads", cell.model, cell.task, cell.variant, f"k{cell.window}"))
        entries.append(FigureSpec(stem, caption, plot_head_heatmap(cell)))
    return [("Head-resolved knockouts (layer x head)", entries)] if entries else []
