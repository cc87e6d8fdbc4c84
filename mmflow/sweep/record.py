"""The sweep record: `sweep.json` (written on every status change) and the terminal summary table."""

from __future__ import annotations

import sys
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmflow.models.provenance import weights_note
from mmflow.secrets import redact
from mmflow.store import CellStore, atomic_write_json

if TYPE_CHECKING:
    from mmflow.sweep.core import Sweep


def labels(cell: dict[str, Any]) -> dict[str, Any]:
    """What a person reads to recognise a cell (its analysis's `Labels`)."""
    from mmflow.analyses import analysis_for

    names = analysis_for(cell).labels
    return {
        "model": cell["model"]["name"],
        "task": cell.get("task"),
        "variant": names.variant,
        # as configured: an invalid window (2.5) must not read as the one it would round to
        "window": cell.get("window", names.window) if names.window is not None else None,
    }


def headline_text(headline: dict[str, Any]) -> str:
    parts = []
    for key, value in headline.items():
        parts.append(f"{key}={value:.3g}" if isinstance(value, float) else f"{key}={value}")
    return " ".join(parts)


def cell_headline(meta: dict[str, Any]) -> str:
    """The summary table's headline of a finished cell; why, for a cell with no scored sample."""
    from mmflow.sweep.curve import nothing_scored

    return nothing_scored(meta) or headline_text(meta.get("headline") or {})


def sweep_record(sweep: Sweep, state: str, error: str | None = None) -> dict[str, Any]:
    """The content of `sweep.json`: the sweep's state, settings, counts and every cell with its jobs."""
    from dataclasses import asdict

    jobs_of: dict[str, list[int]] = {}
    for job in sweep.jobs:
        if job.cell is not None:
            jobs_of.setdefault(job.cell_id, []).append(job.idx)
    cells = []
    for cell_id, cell in sweep.cells.items():
        entry = {"cell_id": cell_id, "status": sweep.status.get(cell_id, "pending"), **labels(cell)}
        entry.update(path=str(Path(cell["results_dir"]) / cell_id), jobs=jobs_of[cell_id])
        if cell_id in sweep.errors and entry["status"] == "failed":
            entry["error"] = sweep.errors[cell_id]
        cells.append(entry)
    return {
        "sweep_name": sweep.name,
        "sweep_dir": str(sweep.sweep_dir),
        "status": state,
        "driver": sweep.driver,
        "error": error,
        "started": datetime.fromtimestamp(sweep.started).isoformat(timespec="seconds"),
        "wall_seconds": round(sweep.elapsed(), 3),
        "launcher": redact(asdict(sweep.settings)),
        "counts": sweep.counts(),
        "cells": cells,
        "failed": sweep.failed_ids(),
        "invalid_jobs": [
            {"job": j.idx, "overrides": redact(j.overrides), "error": j.error} for j in sweep.jobs if j.error
        ],
    }


def write_sweep_json(sweep: Sweep, state: str, error: str | None = None) -> None:
    atomic_write_json(sweep.sweep_dir / "sweep.json", sweep_record(sweep, state, error))


def print_summary(sweep: Sweep) -> None:
    """The final table of cells (status, time, headline numbers) and where everything is."""
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 160)
    table = Table(title=f"mmflow sweep '{sweep.name}'", show_lines=False)
    for column in ("cell", "model", "task", "analysis", "window", "status", "time s", "headline", "node"):
        table.add_column(column, no_wrap=column in ("cell", "status"))
    styles = {"done": "green", "cached": "cyan", "failed": "bold red"}
    for cell_id, cell in sweep.cells.items():
        meta = CellStore(cell["results_dir"], cell).read_meta()
        status = sweep.status.get(cell_id, "pending")
        timings = meta.get("timings") or {}
        seconds = timings.get(
            "batch_seconds", timings.get("group_seconds")
        )  # cells written before the rename
        row = labels(cell)
        window = meta.get("window_used", row["window"])  # the window it ran with, on the loaded depth
        note = weights_note(meta.get("model_info"))
        table.add_row(
            cell_id,
            f"{row['model']} [{note}]" if note else row["model"],
            str(row["task"]),
            str(row["variant"]),
            str(window if window is not None else "-"),
            f"[{styles.get(status, 'yellow')}]{status}[/]",
            f"{seconds:.1f}" if isinstance(seconds, int | float) else "-",
            cell_headline(meta) if status in ("done", "cached") else "-",
            str(meta.get("node_id") or "-")[:8],
        )
    console.print(table)
    counts = sweep.counts()
    console.print(
        f"{counts['done']} done, {counts['cached']} cached, {counts['failed']} failed "
        f"in {sweep.elapsed():.1f} s. Sweep folder: {sweep.sweep_dir}"
    )
    for cell_id in sweep.failed_ids():
        error = (sweep.errors.get(cell_id) or "?").splitlines()[0]
        name = "/".join(str(v) for v in labels(sweep.cells[cell_id]).values())
        console.print(f"[bold red]FAILED[/] {cell_id} ({name}): {error}")
    for job in (j for j in sweep.jobs if j.error):
        console.print(f"[bold red]INVALID[/] job #{job.idx} {' '.join(redact(job.overrides))}: {job.error}")
