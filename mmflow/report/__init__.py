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
from mmflow.report.figures import FigureCache, cells_key, draw_figures, slug
from mmflow.report.html import FigureEntry, render_index
from mmflow.storage.cell_data import CellData, find_cell_dirs, load_cells, read_meta

__all__ = ["build_report", "cell_row", "row_notes", "CellData", "find_cell_dirs", "load_cells"]


def cell_row(cell: CellData, out_dir: Path, note: str = "") -> dict[str, object]:
    """The cells-table row of `cell`: labels (`note` after its analysis label, see `row_notes`),
    counts, the curve's minimum and its layer (for analyses whose headline is a minimum,
    `Analysis.minimum_of`)."""
    counts = cell.counts
    row: dict[str, object] = {
        "model": cell.model_title,
        "task": cell.task,
        "analysis": cell.label + note,
        "window": cell.window if cell.window is not None else "—",
        "correct/total": f"{counts['correct']}/{counts['samples']}",
        "scored": counts["scored"],
        "min (%)": "—",
        "at layer": "—",
        "noise floor (%)": _floor_text(cell),
        "cell": cell.cell_id,
        "cell_href": os.path.relpath(cell.dir, out_dir) + "/",
    }
    value = cell.analysis.minimum_of
    if value is not None and len(cell.results):
        minimum = curve_minimum(cell.analysis.curve_table(cell.results), value)
        row["min (%)"] = f"{minimum[f'min_{value}']:.4g}"
        row["at layer"] = minimum["min_layer"]
    return row


def _floor_text(cell: CellData) -> str:
    """± the cell's numerical noise floor (`cell.json` `noise_floor`, docs/statistics.md), or —."""
    floor = (cell.meta.get("noise_floor") or {}).get("rel_change_pct")
    return f"±{floor:.2g}" if floor is not None else "—"


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


def _entry(spec: FigureSpec, out_dir: Path) -> FigureEntry:
    stem = slug(spec.stem)
    paths = [out_dir / "figures" / f"{stem}.{kind}" for kind in ("png", "pdf")]
    return FigureEntry(spec.caption, *(os.path.relpath(p, out_dir) for p in paths))


def _sections(
    cells: list[CellData], out_dir: Path, notes: list[str], workers: int | None = None
) -> list[tuple[str, list[FigureEntry]]]:
    """Every analysis's own report sections, for its cells (a failing plug-in is noted, not fatal).
    Figures whose cells have not changed are reused (`FigureCache`); the others are drawn, in
    `workers` processes where there are enough of them (`draw_figures`)."""
    specs: list[tuple[str, list[FigureSpec]]] = []
    for kind in dict.fromkeys(cell.kind for cell in cells):
        try:
            specs += analysis_class(kind).report_sections(cells)
        except Exception as exc:  # one analysis's figures must not break the report
            notes.append(f"{kind} figures failed ({type(exc).__name__}: {exc})")
    cache = FigureCache(out_dir / "figures")
    pending = [s for _, entries in specs for s in entries if cache.get(slug(s.stem), s) is None]
    failed = draw_figures(pending, out_dir / "figures", workers)
    for spec in pending:
        if spec.stem in failed:
            notes.append(f"figure {spec.stem} failed ({failed[spec.stem]})")
        else:
            cache.put(slug(spec.stem), spec)
    cache.save()
    return [
        (title, [_entry(s, out_dir) for s in entries if s.stem not in failed]) for title, entries in specs
    ]


def build_report(
    sweep_dir_or_results_dir: str | Path,
    out_dir: str | Path | None = None,
    *,
    cell_dirs: Iterable[str | Path] | None = None,
    workers: int | None = None,
) -> Path:
    """Write the report of every done cell below the folder (or of `cell_dirs`, if given) into
    `out_dir` (default: `<folder>/report`); return the path of `index.html`. `workers`: processes
    that draw figures (default `MMFLOW_REPORT_WORKERS`, else up to 4 by the CPUs; 1: this one)."""
    root = Path(sweep_dir_or_results_dir).resolve()
    out = Path(out_dir).resolve() if out_dir is not None else root / "report"
    out.mkdir(parents=True, exist_ok=True)
    dirs = find_cell_dirs(root) if cell_dirs is None else sorted({Path(d).resolve() for d in cell_dirs})
    cells, left_out = load_cells(dirs)
    notes = [f"not included: {item['dir']} (status {item['status']})" for item in left_out]
    sections = _sections(cells, out, notes, workers)
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
    """What made this report: the command (secrets redacted), the date (UTC), mmflow's version and
    git commit."""
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
    from mmflow.storage.secrets import redact

    args = [str(a) for a in redact(list(sys.argv[1:]))]  # secrets on the command line stay out
    command = " ".join([Path(sys.argv[0]).name if sys.argv else "python", *args])
    return {
        "command": command,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "mmflow": mmflow_version,
        "commit": commit or "unknown",
    }
