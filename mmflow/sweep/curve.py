"""What a single run prints for its cell: why samples were not scored, the per-layer curve as a small
table, and where the files and the figure are."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pandas as pd

from mmflow.storage.cell_data import read_meta

FLIPS = "top1_changed_frac"  # the knockout curve's fraction of top-1 flips per centre layer


def curve_table(cell) -> pd.DataFrame:
    """Per layer of a done cell (`mmflow.storage.cell_data.CellData`): its analysis's `curve_table`
    (knockouts: the mean relative change of p(answer) in %, its 95% band and the fraction of top-1
    flips; other analyses: their own per-layer curves, mean and 95% band per value)."""
    table = cell.analysis.curve_table(cell.results)
    return table.drop(columns=[c for c in ("rel_depth", "sem") if c in table])


def _cells(row: pd.Series, flips: bool) -> list[str]:
    from rich.markup import escape

    low, high = row.get("ci_low"), row.get("ci_high")
    band = escape(f"[{low:.3g}, {high:.3g}]") if pd.notna(low) and pd.notna(high) else "-"  # n < 2: none
    if flips:
        flips = row.get(FLIPS)
        flips_text = f"{100 * flips:.0f}%" if flips is not None and pd.notna(flips) else "-"
        return [str(int(row["layer"])), f"{row['mean']:.3g}", band, flips_text, str(int(row["n"]))]
    label = str(row.get("label", row.get("value", "")))
    return [str(int(row["layer"])), label, f"{row['mean']:.3g}", band, str(int(row["n"]))]


def cell_figure(cell, out_dir: Path) -> Path | None:
    """The cell's figure (the report's own plot) as PNG in `out_dir`, or None if it has none."""
    from mmflow.report.figures import save_figure, slug

    figure = cell.analysis.figure(cell)
    if figure is None:
        return None
    return save_figure(figure, out_dir, slug(cell.model, cell.task, cell.variant, cell.cell_id))["png"]


def unscored_line(meta: dict[str, Any]) -> str | None:
    """One line on the samples of a finished cell (`cell.json`) that were not scored and why, or None."""
    counts = meta.get("counts") or {}
    skipped = {str(k): int(v) for k, v in (counts.get("skipped") or {}).items() if v}
    n_skipped, incorrect = sum(skipped.values()), int(counts.get("incorrect") or 0)
    if not n_skipped and not incorrect:
        return None
    total = int(counts.get("samples") or 0)
    parts = []
    if n_skipped:
        reasons = sorted(skipped.items(), key=lambda kv: (-kv[1], kv[0]))
        parts.append(f"skipped {n_skipped} of {total} samples: " + ", ".join(f"{r} x{n}" for r, n in reasons))
    if incorrect:
        of = "" if n_skipped else f" of {total} samples"
        required = str((meta.get("config") or {}).get("require_correct", True)).lower()
        parts.append(f"{incorrect}{of} answered incorrectly (require_correct={required})")
    prefix = "no sample scored: " if not int(counts.get("scored") or 0) else ""
    return f"{prefix}{'; '.join(parts)} (see samples.parquet)"


def nothing_scored(meta: dict[str, Any]) -> str | None:
    """Why a finished cell (`cell.json`) has no scored sample ("no sample scored: ..."), or None when it
    has one (or is not finished)."""
    counts = meta.get("counts")
    if meta.get("status") != "done" or not isinstance(counts, dict) or int(counts.get("scored") or 0):
        return None
    if not int(counts.get("samples") or 0):
        return "no sample scored: the data source has no sample for this cell"
    return unscored_line(meta)


def status_line(cell_id: str, status: str, cell_dir: str | Path) -> str:
    """The line a single run ends with: the cell's status, and why when it scored no sample."""
    why = nothing_scored(read_meta(cell_dir)) if status in ("done", "cached") else None
    return f"[mmflow] cell {cell_id}: {status}{f' ({why})' if why else ''} -> {cell_dir}"


def print_unscored(cell_dir: str | Path) -> str | None:
    """Print `unscored_line` of the cell in `cell_dir` (nothing when every sample was scored)."""
    try:
        line = unscored_line(json.loads((Path(cell_dir) / "cell.json").read_text()))
    except (OSError, ValueError):
        return None
    if line is not None:
        print(f"[mmflow] {line}")
    return line


def print_cell_curve(cell_dir: str | Path, figure_dir: str | Path) -> Path | None:
    """Print the curve table of the done cell in `cell_dir`; save its figure under `figure_dir`."""
    from rich.console import Console
    from rich.table import Table

    from mmflow.storage.cell_data import load_cell

    cell = load_cell(cell_dir)
    console = Console(width=None if sys.stdout.isatty() else 120)
    if cell is None or not len(cell.results):
        print(f"[mmflow] no scored samples in {cell_dir}: no curve to show")  # plain: rich eats "[mmflow]"
        return None
    table = curve_table(cell)
    flips = FLIPS in table
    if flips:
        title = f"{cell.label}, k = {cell.window}: relative change of p(answer) (%) per centre layer"
        columns = ["centre layer", "mean (%)", "95% band", "top-1 flips", "n"]
    else:
        title = f"{cell.label}: per layer"
        columns = ["layer", "value", "mean", "95% band", "n"]
    view = Table(title=f"{cell.model_title} · {cell.task} · {title}")
    for column in columns:
        view.add_column(column, justify="right" if column not in ("value",) else "left")
    for _, row in table.iterrows():
        view.add_row(*_cells(row, flips))
    console.print(view)
    noise = cell.meta.get("noise_floor") or {}
    if noise.get("rel_change_pct") is not None:
        print(
            f"noise floor: ±{noise['rel_change_pct']:.2g}% of p(answer) ({noise.get('dtype')}, engine "
            f"{noise.get('engine')}): smaller effects are rounding (docs/statistics.md)"
        )
    figure = cell_figure(cell, Path(figure_dir))
    print(f"files:  {cell.dir}  (cell.json, samples.parquet, results.parquet)")
    if figure is not None:
        print(f"figure: {figure}")
    return figure
