"""Figures of issue 18: patching curves beside the knockout curves, and layer x head heat maps.

- `plot_necessity_sufficiency`: one model, task and window; the first panel is the knockout curves
  (relative change of p, necessity), then one panel per corruption with the recovered fraction (%)
  against centre layer, one line per restored group (sufficiency).
- `plot_head_heatmap`: a knockout cell with `knockout.heads: each`; the mean relative change (%) per
  centre layer and head.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from mmflow.report.cells import CellData, knockout_order
from mmflow.report.figures import (
    BAND_NOTE,
    PALETTE,
    Y_LABEL,
    Z95,
    _band,
    curve_stats,
    knockout_color,
    new_figure,
)

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


def draw_patching(ax, cell: CellData) -> None:
    """Recovered fraction (%) against centre layer on `ax`, one line per restored group."""
    from mmflow.analyses.patching import group_label

    curves = patching_curves(cell.results)
    for index, group in enumerate(sorted(curves["group"].unique(), key=_group_key)):
        stats = curves[curves["group"] == group]
        _band(ax, stats["layer"].to_numpy(), stats, PALETTE[index % len(PALETTE)], group_label(group))
    n = int(curves.groupby("layer")["n"].max().max()) if len(curves) else 0
    ax.axhline(0.0, color="0.4", lw=0.8, ls="--", zorder=0)
    ax.axhline(100.0, color="0.4", lw=0.8, ls=":", zorder=0)
    ax.set_title(
        f"Restoring clean states, corruption = {cell.config.get('corruption')} (n = {n})", fontsize=10
    )
    ax.set_ylabel(RECOVERED_LABEL)
    ax.grid(alpha=0.25)
    ax.legend(loc="best", fontsize="small", title=f"Restored group ({BAND_NOTE})", title_fontsize="small")


def draw_knockouts(ax, cells: Sequence[CellData]) -> None:
    """The knockout curves of `cells` (relative change, %) on `ax`."""
    for cell in sorted(cells, key=lambda c: knockout_order(c.knockout)):
        stats = curve_stats(cell.results)
        _band(ax, stats["layer"].to_numpy(), stats, knockout_color(cell.knockout), cell.label)
    ax.axhline(0.0, color="0.4", lw=0.8, ls="--", zorder=0)
    ax.set_title("Attention knockout (necessity)", fontsize=10)
    ax.set_ylabel(Y_LABEL)
    ax.grid(alpha=0.25)
    ax.legend(loc="best", fontsize="small", title=f"Knockout ({BAND_NOTE})", title_fontsize="small")


def plot_necessity_sufficiency(knockouts: Sequence[CellData], patchings: Sequence[CellData]) -> Figure:
    """Knockout curves (if any) beside one recovered-fraction panel per patching cell."""
    panels = ([None] if knockouts else []) + sorted(patchings, key=lambda c: str(c.config.get("corruption")))
    figure = Figure(figsize=(5.2 * len(panels), 4.0), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(panels), sharex=True, squeeze=False)[0]
    first = (list(knockouts) + list(patchings))[0]
    n_layers = max(c.n_layers for c in [*knockouts, *patchings])
    for ax, panel in zip(axes, panels, strict=True):
        if panel is None:
            draw_knockouts(ax, knockouts)
        else:
            draw_patching(ax, panel)
        ax.set_xlim(0, n_layers - 1)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    figure.supxlabel(f"Centre layer of the window (0–{n_layers - 1} of {n_layers} layers)")
    figure.suptitle(
        f"{first.model} — {first.task}: necessity (knockout) and sufficiency (patching), k = {first.window}"
    )
    return figure


def head_table(results: pd.DataFrame, column: str = "rel_change_pct") -> pd.DataFrame:
    """Mean of `column` over samples as a [layer x head] table."""
    return results.groupby(["layer", "head"])[column].mean().unstack("head").sort_index()


def plot_head_heatmap(cell: CellData) -> Figure:
    """Mean relative change (%) per centre layer (rows) and head (columns) of a per-head knockout cell."""
    table = head_table(cell.results)
    figure, ax = new_figure(width=1.2 + 0.55 * table.shape[1] + 1.5, height=1.4 + 0.35 * table.shape[0])
    values = table.to_numpy()
    low, high = float(np.nanmin(values)), float(np.nanmax(values))
    norm = TwoSlopeNorm(vcenter=0.0, vmin=min(low, -1e-9), vmax=max(high, 1e-9))
    image = ax.imshow(values, cmap="RdBu", norm=norm, aspect="auto", origin="lower")
    ax.set_xticks(range(table.shape[1]), [str(h) for h in table.columns])
    ax.set_yticks(range(table.shape[0]), [str(layer) for layer in table.index])
    ax.set_xlabel("Attention head (blocked alone)")
    ax.set_ylabel("Centre layer of the window")
    n = int(cell.results.groupby(["layer", "head"]).size().max())
    ax.set_title(
        f"{cell.model} — {cell.task}: {cell.spec.label} per head (k = {cell.window}, n = {n})", fontsize=10
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
    means["ci95"] = Z95 * means["sem"]
    return means.sort_values("rel_change_pct").head(top).reset_index()


def patching_sections(cells: Sequence[CellData], out_dir, notes: list[str], save) -> list[tuple[str, list]]:
    """Report sections: knockout beside patching per (model, task, window); per-head heat maps.

    `save(figure, fig_dir, stem, caption, out_dir)` writes a figure and returns its report entry.
    """
    from mmflow.report.figures import slug

    fig_dir = out_dir / "figures"
    sections = []
    patchings = [c for c in cells if c.analysis == "patching" and len(c.results)]
    entries = []
    for key in sorted({(c.model, c.task, c.window) for c in patchings}):
        chosen = [c for c in patchings if (c.model, c.task, c.window) == key]
        knockouts = [
            c
            for c in cells
            if c.analysis == "knockout"
            and c.heads is None
            and len(c.results)
            and (c.model, c.task, c.window) == key
        ]
        try:
            figure = plot_necessity_sufficiency(knockouts, chosen)
        except Exception as exc:  # one bad figure must not break the report
            notes.append(f"patching figure {key}: {type(exc).__name__}: {exc}")
            continue
        caption = f"{key[0]} — {key[1]} (k = {key[2]}): knockout and patching"
        entries.append(save(figure, fig_dir, slug("patching", *key), caption, out_dir))
    if entries:
        sections.append(("Necessity (knockout) and sufficiency (patching)", entries))
    heads = [c for c in cells if c.analysis == "knockout" and c.heads == "each" and len(c.results)]
    entries = []
    for cell in heads:
        caption = f"{cell.model} — {cell.task}: {cell.spec.label} per head (k = {cell.window})"
        stem = slug("heads", cell.model, cell.task, cell.knockout, f"k{cell.window}")
        entries.append(save(plot_head_heatmap(cell), fig_dir, stem, caption, out_dir))
    if entries:
        sections.append(("Head-resolved knockouts (layer x head)", entries))
    return sections
