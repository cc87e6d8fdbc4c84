"""The local report: the paper's figures and a cells table, from cell folders alone.

`build_report(folder)` finds every cell folder below `folder` (a `cell.json` with status done; a
sweep folder's `sweep.json` also names its cells), reads its config from `cell.json` and its numbers
from `results.parquet` / `samples.parquet`, and writes PNG + PDF figures and one `index.html` into
`folder/report` (or `out_dir`).
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

from mmflow.report.cells import CellData, find_cell_dirs, load_cells
from mmflow.report.figures import (
    curve_stats,
    plot_answer_tracking_cell,
    plot_cross_model,
    plot_model_overview,
    plot_model_task,
    save_figure,
    slug,
)
from mmflow.report.html import FigureEntry, render_index
from mmflow.report.patching import patching_sections

__all__ = ["build_report", "cell_row", "CellData", "find_cell_dirs", "load_cells"]


def cell_row(cell: CellData, out_dir: Path) -> dict[str, object]:
    """The cells-table row of `cell`: labels, counts, the curve's minimum and its layer."""
    counts = cell.counts
    row: dict[str, object] = {
        "model": cell.model,
        "task": cell.task,
        "knockout": cell.label,
        "window": cell.window if cell.window is not None else "—",
        "correct/total": f"{counts['correct']}/{counts['samples']}",
        "scored": counts["scored"],
        "min (%)": "—",
        "at layer": "—",
        "cell": cell.cell_id,
        "cell_href": os.path.relpath(cell.dir, out_dir) + "/",
    }
    if cell.analysis == "knockout" and cell.heads == "each" and len(cell.results):
        headline = cell.meta.get("headline", {})
        row["min (%)"] = f"{headline.get('min_rel_change_pct', float('nan')):.4g}"
        row["at layer"] = f"{headline.get('min_layer')} (head {headline.get('min_head')})"
    elif cell.analysis == "knockout" and len(cell.results):
        stats = curve_stats(cell.results).set_index("layer")["mean"]
        row["min (%)"] = f"{stats.min():.4g}"
        row["at layer"] = int(stats.idxmin())
    return row


def _by(cells: list[CellData], *keys: str) -> dict[tuple, list[CellData]]:
    groups: dict[tuple, list[CellData]] = defaultdict(list)
    for cell in cells:
        groups[tuple(getattr(cell, k) for k in keys)].append(cell)
    return groups


def _save(figure, fig_dir: Path, stem: str, caption: str, out_dir: Path) -> FigureEntry:
    paths = save_figure(figure, fig_dir, stem)
    return FigureEntry(caption, *(os.path.relpath(paths[k], out_dir) for k in ("png", "pdf")))


def _knockout_sections(cells: list[CellData], out_dir: Path) -> list[tuple[str, list[FigureEntry]]]:
    fig_dir = out_dir / "figures"
    knockouts = [c for c in cells if c.analysis == "knockout" and len(c.results) and c.heads != "each"]
    per_model = [
        _save(
            plot_model_task(group),
            fig_dir,
            slug(model, task, f"k{k}"),
            f"{model} — {task} (k = {k})",
            out_dir,
        )
        for (model, task, k), group in _by(knockouts, "model", "task", "window").items()
    ]
    cross = [
        _save(
            plot_cross_model(group),
            fig_dir,
            slug("cross", task, knockout),
            f"{group[0].label} — {task} (relative depth)",
            out_dir,
        )
        for (task, knockout), group in _by(knockouts, "task", "knockout").items()
    ]
    overview = [
        _save(
            plot_model_overview(group),
            fig_dir,
            slug(model, "overview", f"k{k}"),
            f"{model} — every task (k = {k})",
            out_dir,
        )
        for (model, k), group in _by(knockouts, "model", "window").items()
        if len({c.task for c in group}) > 1
    ]
    sections = [("Per model and task", per_model), ("Across models (relative depth)", cross)]
    return ([("Per model: every task", overview)] if overview else []) + sections


def _answer_tracking_section(cells: list[CellData], out_dir: Path, notes: list[str]) -> list[FigureEntry]:
    entries = []
    for cell in (c for c in cells if c.analysis == "answer_tracking"):
        try:
            figure = plot_answer_tracking_cell(cell)
        except Exception as exc:  # another module's plot must not break the report
            notes.append(f"answer tracking cell {cell.cell_id}: figure failed ({type(exc).__name__}: {exc})")
            continue
        if figure is None:
            notes.append(
                f"answer tracking cell {cell.cell_id} ({cell.model}, {cell.task}) skipped: "
                "mmflow.analyses.answer_tracking.plot_answer_tracking is not available"
            )
            continue
        stem = slug("answer_tracking", cell.model, cell.task, cell.cell_id)
        entries.append(_save(figure, out_dir / "figures", stem, f"{cell.model} — {cell.task}", out_dir))
    return entries


def build_report(
    sweep_dir_or_results_dir: str | Path,
    out_dir: str | Path | None = None,
    *,
    cell_dirs: Iterable[str | Path] | None = None,
) -> Path:
    """Write the report of every done cell below the folder (or of `cell_dirs`, if given) into
    `out_dir` (default: `<folder>/report`); return the path of `index.html`."""
    root = Path(sweep_dir_or_results_dir).resolve()
    out = Path(out_dir).resolve() if out_dir is not None else root / "report"
    out.mkdir(parents=True, exist_ok=True)
    dirs = find_cell_dirs(root) if cell_dirs is None else sorted({Path(d).resolve() for d in cell_dirs})
    cells, left_out = load_cells(dirs)
    notes = [f"not included: {item['dir']} (status {item['status']})" for item in left_out]
    others = sorted({c.analysis for c in cells} - {"knockout", "answer_tracking", "patching"})
    notes += [f"analysis {kind!r} has no figure in the report" for kind in others]
    sections = _knockout_sections(cells, out)
    tracking = _answer_tracking_section(cells, out, notes)
    if tracking or any(c.analysis == "answer_tracking" for c in cells):
        sections.append(("Answer tracking (logit lens)", tracking))
    sections += patching_sections(cells, out, notes, _save)
    rows = [cell_row(c, out) for c in cells]
    index = out / "index.html"
    index.write_text(render_index(str(root), rows, sections, notes), encoding="utf-8")
    return index
