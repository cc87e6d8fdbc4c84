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
from mmflow.report.cells import CellData, find_cell_dirs, load_cells, read_meta
from mmflow.report.figures import FigureCache, cells_key, save_figure, slug
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
    rows = cached_rows(cells, out, notes_of)
    failed = failed_cells(left_out)
    notes = [n for n in notes if not n.endswith("(status failed)")]  # listed with their error instead
    index = out / "index.html"
    page = render_index(str(root), rows, sections, notes, header=provenance(), failed=failed)
    index.write_text(page, encoding="utf-8")
    return index


def cached_rows(cells: list[CellData], out: Path, notes_of: dict[int, str]) -> list[dict[str, object]]:
    """`cell_row` of every cell, reused from `<out>/figures/rows.json` for cells whose content and
    note have not changed (a row reads both parquet files and computes the curve)."""
    import json

    path = out / "figures" / "rows.json"
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        cache = {}
    rows, fresh = [], {}
    for cell in cells:
        note = notes_of[id(cell)]
        key = cells_key([cell], note, str(out))
        entry = cache.get(cell.cell_id)
        row = (
            entry["row"] if isinstance(entry, dict) and entry.get("key") == key else cell_row(cell, out, note)
        )
        fresh[cell.cell_id] = {"key": key, "row": row}
        rows.append(row)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(fresh, default=str))
    return rows


def failed_cells(left_out: list[dict[str, str]]) -> list[dict[str, str]]:
    """The failed cells among those left out: id, model/task, the first line of their error."""
    out = []
    for item in (i for i in left_out if i["status"] == "failed"):
        meta = read_meta(Path(item["dir"]))
        config = meta.get("config", {})
        name = f"{config.get('model', {}).get('name', '?')}/{config.get('task', '?')}"
        error = (str(meta.get("error") or "?").strip().splitlines() or ["?"])[0]
        out.append({"cell": Path(item["dir"]).name, "name": name, "error": error})
    return out


def provenance() -> dict[str, str]:
    """What made this report: the command, the date (UTC), mmflow's version and git commit."""
    import subprocess
    import sys
    from datetime import datetime, timezone
    from importlib.metadata import PackageNotFoundError, version

    try:
        mmflow_version = version("mmflow")
    except PackageNotFoundError:
        mmflow_version = "unknown"
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        commit = ""
    command = " ".join([Path(sys.argv[0]).name if sys.argv else "python", *sys.argv[1:]])
    return {
        "command": command,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "mmflow": mmflow_version,
        "commit": commit or "unknown",
    }
