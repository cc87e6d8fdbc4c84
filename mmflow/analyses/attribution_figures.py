"""Report figures of attribution cells: the layer x head map of estimates, verified cells outlined,
beside the exact per-head knockout map of the same model, task, knockout and window where one exists."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle


def estimate_table(results: pd.DataFrame, column: str) -> pd.DataFrame:
    """Mean over samples of `column` per (layer, head) (summed over source tokens first), [layer x head]."""
    per_sample = results.groupby(["question_id", "layer", "head"])[column].sum(min_count=1)
    return per_sample.groupby(["layer", "head"]).mean().unstack("head").sort_index()


def agreement_text(headline: dict[str, Any]) -> str:
    """ "Spearman 0.93, recall@k 0.80, control FN 0.00 (n = 40 verified)" from a cell's headline."""
    if not headline.get("n_verified"):
        return "nothing verified"
    return (
        f"Spearman {headline.get('spearman', float('nan')):.2f}, recall@k {headline['recall_at_k']:.2f}, "
        f"control FN {headline['control_fn_rate']:.2f} (n = {headline['n_verified']} verified)"
    )


def _heatmap(figure, ax, table: pd.DataFrame, label: str, outlined: dict | None = None) -> None:
    """A diverging layer x head map; `outlined` {(layer, head): share of samples verified} is written in
    each cell, and cells verified in at least half the samples are outlined."""
    values = table.to_numpy(float)
    finite = values[np.isfinite(values)]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    norm = TwoSlopeNorm(vcenter=0.0, vmin=min(low, -1e-9), vmax=max(high, 1e-9))
    image = ax.imshow(values, cmap="RdBu", norm=norm, aspect="auto", origin="lower")
    ax.set_xticks(range(table.shape[1]), [str(h) for h in table.columns])
    ax.set_yticks(range(table.shape[0]), [str(layer) for layer in table.index])
    ax.set_xlabel("Attention head")
    ax.set_ylabel("Centre layer of the window")
    figure.colorbar(image, ax=ax, label=label)
    if outlined is None:
        return
    rows, cols = list(table.index), list(table.columns)
    for (layer, head), share in outlined.items():
        x, y = cols.index(head), rows.index(layer)
        ax.text(x, y, f"{share:.0%}", ha="center", va="center", fontsize=6)
        if share >= 0.5:
            ax.add_patch(Rectangle((x - 0.5, y - 0.5), 1, 1, fill=False, lw=1.5, ec="black"))


def plot_attribution(cell: Any, exact: Any | None = None):
    """Mean estimated Δ log p per (layer, head), verified cells outlined; the exact per-head cell beside."""
    results = cell.results
    table = estimate_table(results, "estimate")
    per_sample = results.groupby(["question_id", "layer", "head"])["verified"].any()
    outlined = per_sample.groupby(["layer", "head"]).mean().to_dict()
    panels = 2 if exact is not None else 1
    width = (1.2 + 0.45 * table.shape[1] + 1.5) * panels
    figure = Figure(figsize=(width, 1.6 + 0.3 * table.shape[0]), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, panels, squeeze=False)[0]
    _heatmap(figure, axes[0], table, "Estimated Δ log p(answer)", outlined)
    headline = cell.meta.get("headline") or cell.analysis.headline(results)
    axes[0].set_title(
        f"Estimate (% of samples verified; outlined: ≥ 50%)\n{agreement_text(headline)}", fontsize=8
    )
    if exact is not None:
        exact_table = estimate_table(exact.results, "logp_change")
        _heatmap(figure, axes[1], exact_table, "Exact Δ log p(answer)")
        axes[1].set_title("Exact knockout, per head (knockout.heads=each)", fontsize=8)
    figure.suptitle(f"{cell.model} — {cell.task}: {cell.label} (k = {cell.window})", fontsize=10)
    return figure


def _exact_match(cell: Any, cells: Sequence[Any]) -> Any | None:
    """A per-head knockout cell (`knockout.heads: each`) of the same model, task, knockout and window."""
    for other in cells:
        if other.kind != "knockout" or not len(other.results) or other.analysis.heads != "each":
            continue
        same = (other.model, other.task, other.window) == (cell.model, cell.task, cell.window)
        if same and other.analysis.spec.name == cell.analysis.spec.name:
            return other
    return None


def attribution_sections(cells: Sequence[Any]) -> list[tuple[str, list]]:
    """One figure per attribution cell (beside its exact per-head cell when the report has one)."""
    from mmflow.analyses.base import FigureSpec

    entries = []
    for cell in (c for c in cells if c.kind == "attribution" and len(c.results)):
        headline = cell.meta.get("headline") or cell.analysis.headline(cell.results)
        caption = f"{cell.model} — {cell.task}: {cell.label} (k = {cell.window}); {agreement_text(headline)}"
        stem = "__".join(("attribution", cell.model, cell.task, cell.cell_id))
        entries.append(FigureSpec(stem, caption, plot_attribution(cell, _exact_match(cell, cells))))
    return [("Attribution screen (estimates vs exact knockouts)", entries)] if entries else []
