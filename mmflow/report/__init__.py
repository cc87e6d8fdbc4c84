"""The local report: the paper's figures and a cells table, from cell folders alone.

`build_report(folder)` finds every cell folder below `folder` (a `cell.json` with status done; a
sweep folder's `sweep.json` also names its cells), reads its config from `cell.json` and its numbers
from `results.parquet` / `samples.parquet`, and writes PNG + PDF figures and one `index.html` into
`folder/report` (or `out_dir`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from mmflow.analyses import FigureSpec, analysis_class
from mmflow.analyses.curves import curve_minimum
from mmflow.analyses.plots import distinguishing_notes
from mmflow.report.cells import CellData, find_cell_dirs, load_cells
from mmflow.report.figures import FigureCache, save_figure, slug
from mmflow.report.html import FigureEntry, render_index

__all__ = ["build_report", "cell_row", "row_notes", "CellData", "find_cell_dirs", "load_cells"]


def cell_row(cell: CellData, out_dir: Path, note: str = "") -> dict[str, object]:
    """The cells-table row of `cell`: labels (`note` after its analysis label, see `row_notes`),
    counts, the curve's minimum and its layer (for analyses whose headline is a minimum,
    `Analysis.minimum_of`)."""
    counts = cell.counts
    row: dict[str, object] = {
        "model": cell.model,
        "task": cell.task,
        "analysis": cell.label + note,
        "window": cell.window if cell.window is not None else "—",
        "correct/total": f"{counts['correct']}/{counts['samples']}",
        "scored": counts["scored"],
        "min (%)": "—",
        "at layer": "—",
        "cell": cell.cell_id,
        "cell_href": os.path.relpath(cell.dir, out_dir) + "/",
    }
    value = cell.analysis.minimum_of
    if value is not None and len(cell.results):
        minimum = curve_minimum(cell.analysis.curve_table(cell.results), value)
        row["min (%)"] = f"{minimum[f'min_{value}']:.4g}"
        row["at layer"] = minimum["min_layer"]
    return row


def row_notes(cells: list[CellData]) -> dict[int, str]:
    """By `id(cell)`: what tells apart cells whose rows would read the same (model, task, analysis,
    window), e.g. " (data=table)" (`distinguishing_notes`); "" for a cell no other row repeats."""
    groups: dict[tuple, list[CellData]] = {}
    for cell in cells:
        groups.setdefault((cell.model, cell.task, cell.kind, cell.label, cell.window), []).append(cell)
    notes = {}
    for group in groups.values():
        notes.update(zip(map(id, group), distinguishing_notes(group), strict=True))
    return notes


def _save(spec: FigureSpec, out_dir: Path, cache: FigureCache) -> FigureEntry:
    """The figure's files: reused when the cache holds them for the same cells, else drawn."""
    stem = slug(spec.stem)
    paths = cache.get(stem, spec)
    if paths is None:
        paths = save_figure(spec.figure, out_dir / "figures", stem)
        cache.put(stem, spec)
    return FigureEntry(spec.caption, *(os.path.relpath(paths[k], out_dir) for k in ("png", "pdf")))


def _sections(cells: list[CellData], out_dir: Path, notes: list[str]) -> list[tuple[str, list[FigureEntry]]]:
    """Every analysis's own report sections, for its cells (a failing plug-in is noted, not fatal)."""
    sections = []
    cache = FigureCache(out_dir / "figures")
    try:
        for kind in dict.fromkeys(cell.kind for cell in cells):
            try:
                specs = analysis_class(kind).report_sections(cells)
                sections += [(title, [_save(s, out_dir, cache) for s in entries]) for title, entries in specs]
            except Exception as exc:  # one analysis's figures must not break the report
                notes.append(f"{kind} figures failed ({type(exc).__name__}: {exc})")
    finally:
        cache.save()
    return sections


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
    sections = _sections(cells, out, notes)
    notes_of = row_notes(cells)
    rows = [cell_row(c, out, notes_of[id(c)]) for c in cells]
    index = out / "index.html"
    index.write_text(render_index(str(root), rows, sections, notes), encoding="utf-8")
    return index
