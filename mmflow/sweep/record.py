"""The sweep record, O(1) per cell: `events.jsonl` and `sweep.json`; the terminal summary.

- `events.jsonl`: one appended JSON line per status change of a cell (`t`, `cell_id`, `status`,
  `error`), flushed at once, so the sweep's progress is readable while it runs;
- `sweep.json`: the whole record (settings, counts, every cell with its jobs). Written when the sweep
  starts and ends, and while it runs at most every `hydra.launcher.record_every_s` seconds, never per
  cell (rewriting it after every cell made a 5,000-cell sweep quadratic).
"""

from __future__ import annotations

import json
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from mmflow.models.provenance import weights_note
from mmflow.storage.secrets import redact
from mmflow.storage.store import atomic_write_json


class Sweep(Protocol):
    """What the record reads of a sweep (`mmflow.sweep.core.Sweep` is one): the record never imports
    the code that runs the sweep."""

    name: str
    sweep_dir: Path
    jobs: list[Any]  # CellJob: idx, overrides, cell, cell_id, error
    settings: Any  # a SweepSettings dataclass
    started: float
    driver: dict[str, Any]
    cells: dict[str, dict[str, Any]]
    status: dict[str, str]
    errors: dict[str, str]
    record_written: float

    def labels(self, cell_id: str) -> dict[str, Any]: ...
    def store(self, cell_id: str) -> Any: ...
    def counts(self) -> dict[str, int]: ...
    def elapsed(self) -> float: ...
    def failed_ids(self) -> list[str]: ...
    def invalid_jobs(self) -> list[Any]: ...


class EventLog:
    """`events.jsonl` of a sweep: one line per status change, appended and flushed."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file: Any = None

    def append(self, cell_id: str, status: str, error: str | None = None) -> None:
        if self.file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.file = self.path.open("a", encoding="utf-8")
        event: dict[str, Any] = {"t": round(time.time(), 3), "cell_id": cell_id, "status": status}
        if error:
            event["error"] = redact(error)
        self.file.write(json.dumps(event) + "\n")
        self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


def read_events(path: Path) -> dict[str, str]:
    """The last status of every cell in an `events.jsonl` (a torn last line is skipped)."""
    status: dict[str, str] = {}
    if not path.exists():
        return status
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue
        status[event["cell_id"]] = event["status"]
    return status


def labels(cell: dict[str, Any]) -> dict[str, Any]:
    """What a person reads to recognise a cell (its analysis's `Labels`)."""
    from mmflow.analyses import analysis_for

    model = (cell.get("model") or {}).get("name") if isinstance(cell.get("model"), dict) else None
    try:
        names = analysis_for(cell).labels
    except Exception:  # noqa: BLE001 - an invalid cell (its error is recorded) still needs a name
        return {"model": model, "task": cell.get("task"), "variant": cell.get("analysis"), "window": None}
    return {
        "model": model,
        "task": cell.get("task"),
        "variant": names.variant,
        # as configured: an invalid window (2.5) must not read as the one it would round to
        "window": cell.get("window", names.window) if names.window is not None else None,
    }


def headline_text(headline: dict[str, Any]) -> str:
    """`key=value …` of a cell's headline: every float in one fixed-point format (three decimals, for the
    headline's percentages and correlations alike), integers as they are."""
    parts = []
    for key, value in headline.items():
        parts.append(f"{key}={value:.3f}" if isinstance(value, float) else f"{key}={value}")
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
        entry = {"cell_id": cell_id, "status": sweep.status.get(cell_id, "pending"), **sweep.labels(cell_id)}
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
        "events": "events.jsonl",
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
    sweep.record_written = time.monotonic()


SUMMARY_ROWS = 40  # a larger sweep's table shows its failed cells and then the first done ones


def print_summary(sweep: Sweep) -> None:
    """The table of cells (status, time, headline numbers; at most `SUMMARY_ROWS` rows), the counts,
    then the failures grouped by cause (`failure_groups`): the last thing the sweep prints."""
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 160)
    table = Table(title=f"mmflow sweep '{sweep.name}'", show_lines=False)
    # "batch s": the seconds of the cell batch the cell ran in (its cells share one clean pass per sample)
    columns = ("cell", "model", "task", "analysis", "window", "status", "batch s", "headline", "node")
    for column in columns:
        table.add_column(
            column, no_wrap=column in ("cell", "status"), justify="right" if column == "batch s" else "left"
        )
    styles = {"done": "green", "cached": "cyan", "failed": "bold red"}
    order = sorted(sweep.cells, key=lambda cid: sweep.status.get(cid) != "failed")
    for cell_id in order[:SUMMARY_ROWS]:
        meta = sweep.store(cell_id).read_meta()
        status = sweep.status.get(cell_id, "pending")
        timings = meta.get("timings") or {}
        seconds = timings.get(
            "batch_seconds", timings.get("group_seconds")
        )  # cells written before the rename
        row = sweep.labels(cell_id)
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
    if len(order) > SUMMARY_ROWS:
        table.caption = f"{len(order) - SUMMARY_ROWS} more cells in {sweep.sweep_dir / 'sweep.json'}"
    console.print(table)
    counts = sweep.counts()
    invalid = len(sweep.invalid_jobs())  # jobs without a cell: not in counts, never computed
    console.print(
        f"{counts['done']} done, {counts['cached']} cached, {counts['failed']} failed"
        + (f", {invalid} invalid job{'s' * (invalid != 1)}" if invalid else "")
        + f" in {sweep.elapsed():.1f} s. Sweep folder: {sweep.sweep_dir}"
    )
    print_failure_groups(console, sweep)


def failure_groups(sweep: Sweep) -> list[dict[str, Any]]:
    """Failed cells and invalid jobs grouped by cause: {kind, cause, count, first, fix}, largest
    first; `kind` is "failed" (cells) or "invalid" (jobs without a cell), never mixed in a group."""
    from mmflow.sweep.causes import cause_of

    groups: dict[tuple[str, str], dict[str, Any]] = {}

    def add(kind: str, error: str, first: str) -> None:
        cause, fix = cause_of(error)
        group = {"kind": kind, "cause": cause, "count": 0, "first": first, "fix": fix}
        groups.setdefault((kind, cause), group)["count"] += 1

    for cell_id in sweep.failed_ids():
        name = "/".join(str(v) for v in sweep.labels(cell_id).values())
        add("failed", sweep.errors.get(cell_id) or "?", f"{cell_id} ({name})")
    for job in sweep.invalid_jobs():
        add("invalid", job.error or "?", f"job #{job.idx} {' '.join(redact(job.overrides))}")
    return sorted(groups.values(), key=lambda g: -g["count"])


def print_failure_groups(console: Any, sweep: Sweep) -> None:
    """ "N failed, M invalid jobs (K causes):" then per cause its count, first cell or job and fix."""
    groups = failure_groups(sweep)
    if not groups:
        return
    failed = sum(g["count"] for g in groups if g["kind"] == "failed")
    invalid = sum(g["count"] for g in groups if g["kind"] == "invalid")
    parts = [f"{failed} failed"] if failed else []
    if invalid:
        parts.append(f"{invalid} invalid job{'s' * (invalid != 1)}")
    causes = f"{len(groups)} cause{'s' if len(groups) > 1 else ''}"
    console.print(f"[bold red]{', '.join(parts)}[/] ({causes}):")
    for group in groups:
        label = "FAILED" if group["kind"] == "failed" else "INVALID"
        console.print(f"[bold red]{label}[/] x{group['count']}: {group['cause']}", highlight=False)
        console.print(f"    first: {group['first']}", highlight=False)
        if group["fix"]:
            console.print(f"    fix: {group['fix']}", highlight=False)


def print_failure_line(sweep: Sweep) -> None:
    """A single run's failure as one line: `[mmflow] cell <id> failed: <cause> (fix: …)`."""
    from mmflow.sweep.causes import cause_of

    for cell_id in sweep.failed_ids():
        error = (sweep.errors.get(cell_id) or "?").strip().splitlines()[0]
        fix = cause_of(error)[1]
        print(f"[mmflow] cell {cell_id} failed: {error}" + (f" (fix: {fix})" if fix else ""), flush=True)


def announce_from_record(store: Any) -> None:
    """A cell a Ray actor computed: its engine and noise-floor line (`execution.cell.noise_line`),
    printed by the driver from its `cell.json` (Ray may drop an actor's last lines at the end)."""
    from mmflow.execution.cell import noise_line

    meta = store.read_meta()
    noise = meta.get("noise_floor")
    if isinstance(noise, dict) and meta.get("engine"):
        wanted = str(((meta.get("config") or {}).get("engine") or {}).get("name", ""))
        print(noise_line(store.id, wanted, str(meta["engine"]), noise), file=sys.stderr, flush=True)
