"""Benchmark of the sweep driver: what a grid of N cells costs around the engine (no model weights).

`python -m mmflow.bench --driver --cells N` (or `mmflow bench --driver --cells N`) builds a synthetic
grid of N knockout cells of toy-llava on the shapes data (task x knockout x window x n_samples) in a
temporary results folder and times, in this process, through the real Hydra launcher:

- `plan_first_s`: planning with every cell new (Hydra composition, cell resolution, the plan view);
- `plan_s`: planning again once part of the grid is on disk (cached, partial and failed cells are
  fabricated: cell.json plus parquet files, no model runs), the plan's counts reported;
- `cached_rerun_s`: the sweep run with every cell cached (`mmflow run -m` on a finished grid:
  composition, the done check of each cell, the record, the summary; no report);
- `record_write_ms_per_cell`: two status changes per cell through `Sweep.record` (the events line,
  the throttled `sweep.json`);
- `report_s` / `report_cached_s`: the HTML report of `--report-cells` cells (default min(N, 1000)),
  then again with its figures on disk.

The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

TASKS = ("ChooseAttr", "ChooseCat", "ChooseRel", "CompareAttr", "LogicalObj", "QueryAttr")
KNOCKOUTS = (
    "image_to_question",
    "object_to_question",
    "nonobject_to_question",
    "question_to_last",
    "image_to_last",
    "last_to_last",
)
WINDOWS = (1, 2, 3, 4, 5, 6)  # toy-llava has 6 layers
N_LAYERS = 6


def grid(n: int) -> list[list[str]]:
    """N jobs' overrides: task x knockout x window, then n_samples 1, 2, … until there are N."""
    per = len(TASKS) * len(KNOCKOUTS) * len(WINDOWS)
    jobs = [
        [f"n_samples={s}", f"task={t}", f"knockout={k}", f"window={w}"]
        for s in range(1, math.ceil(n / per) + 1)
        for t in TASKS
        for k in KNOCKOUTS
        for w in WINDOWS
    ]
    return jobs[:n]


class Driver:
    """The launcher in this process, as `mmflow run -m` sets it up (Hydra's context, master config)."""

    def __init__(self, results: Path, sweeps: Path) -> None:
        from hydra import initialize_config_dir

        from mmflow.config.dirs import CONF_DIR
        from mmflow.storage.locks import register_resolvers

        register_resolvers()
        self.results, self.sweeps, self.n = results, sweeps, 0
        self.context = initialize_config_dir(str(CONF_DIR), version_base="1.3")
        self.context.__enter__()

    def launcher(self, *extra: str, **settings: Any) -> Any:
        """A set-up launcher; `settings` are `hydra.launcher` keys, `extra` more Hydra overrides."""
        from hydra import compose
        from hydra.core.global_hydra import GlobalHydra
        from hydra.core.hydra_config import HydraConfig
        from hydra.core.utils import setup_globals
        from hydra.types import HydraContext

        from hydra_plugins.mmflow_launcher import MmflowLauncher

        self.n += 1
        overrides = [
            f"results_dir={self.results}",
            "logger=none",
            f"hydra.sweep.dir={self.sweeps / str(self.n)}",
            "hydra.launcher.executor=local",
            "hydra.launcher.progress=none",
            "hydra.launcher.report=false",
            *(f"hydra.launcher.{k}={v}" for k, v in settings.items()),
            *extra,
        ]
        setup_globals()
        config = compose("config", overrides=overrides, return_hydra_config=True)
        HydraConfig.instance().set_config(config)
        from hydra._internal.callbacks import Callbacks

        launcher = MmflowLauncher(**config.hydra.launcher)
        context = HydraContext(
            config_loader=GlobalHydra.instance().config_loader(), callbacks=Callbacks(config)
        )
        launcher.setup(hydra_context=context, task_function=lambda cfg: None, config=config)
        return launcher

    def close(self) -> None:
        from mmflow.sweep.display import restore_log_lines

        self.context.__exit__(None, None, None)
        restore_log_lines()


def parquet_files(n_samples: int, cache: dict[int, Path], folder: Path) -> Path:
    """A folder with results.parquet and samples.parquet of `n_samples` synthetic samples (once per n)."""
    import numpy as np
    import pandas as pd

    from mmflow.storage.store import atomic_write_parquet

    if n_samples not in cache:
        rng = np.random.default_rng(n_samples)
        src = folder / f"n{n_samples}"
        results = pd.DataFrame(
            [
                {"question_id": f"q{s}", "layer": layer, "rel_change_pct": float(rng.normal(-10, 5))}
                for s in range(n_samples)
                for layer in range(N_LAYERS)
            ]
        )
        samples = pd.DataFrame(
            {"question_id": [f"q{s}" for s in range(n_samples)], "status": "scored", "correct": True}
        )
        atomic_write_parquet(src / "results.parquet", results)
        atomic_write_parquet(src / "samples.parquet", samples)
        cache[n_samples] = src
    return cache[n_samples]


def fabricate(cell: dict[str, Any], state: str, cache: dict[int, Path], folder: Path) -> None:
    """Put a cell on disk as `state` (done | partial | failed) without computing it."""
    from mmflow.storage.store import CellStore, atomic_write_json

    store = CellStore(cell["results_dir"], cell)
    store.dir.mkdir(parents=True, exist_ok=True)
    n = int(cell["n_samples"])
    meta: dict[str, Any] = {"cell_id": store.id, "status": state, "config": cell}
    if state == "done":
        src = parquet_files(n, cache, folder)
        for name in ("results.parquet", "samples.parquet"):
            target = store.dir / name
            target.unlink(missing_ok=True)
            try:
                os.link(src / name, target)
            except OSError:
                shutil.copyfile(src / name, target)
        meta.update(rows={"results.parquet": n * N_LAYERS, "samples.parquet": n}, counts={"samples": n})
    elif state == "partial":
        store.parts.mkdir(exist_ok=True)
        (store.parts / "samples-q0.parquet").write_bytes(b"")
        meta["status"] = "running"
    else:
        meta["error"] = "synthetic failure"
    atomic_write_json(store.meta_path, meta)


def timed(fn: Any) -> tuple[Any, float]:
    started = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - started


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        prog="python -m mmflow.bench --driver", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--cells", type=int, default=1000)
    parser.add_argument(
        "--report-cells",
        type=int,
        default=None,
        help="cells in the timed report (default min(N, 1000); 0: no report)",
    )
    parser.add_argument("--keep", default=None, help="work in this folder and keep it (default: a temp one)")
    args = parser.parse_args(argv)
    work = Path(args.keep or tempfile.mkdtemp(prefix="mmflow-driver-bench-")).resolve()
    results, sweeps, parquet = work / "results", work / "sweeps", work / "parquet"
    common = [f"results_dir={results}", "logger=none"]  # Hydra's sweeper gives every job these
    jobs = [[*common, *job] for job in grid(args.cells)]
    driver = Driver(results, sweeps)
    out: dict[str, Any] = {"cells": len(jobs)}
    try:
        launcher = driver.launcher(plan="true")
        _, out["plan_first_s"] = timed(lambda: launcher.launch(jobs, 0))
        cells = {}
        for job in (j for j in launcher_jobs(launcher) if j.cell is not None):
            cells.setdefault(job.cell_id, job.cell)
        ids = list(cells)
        cache: dict[int, Path] = {}
        for i, cell_id in enumerate(ids):  # half cached, 1 in 20 partial, 1 in 20 failed, the rest new
            state = "done" if i % 2 == 0 else {1: "partial", 3: "failed"}.get(i % 40, "")
            if state:
                fabricate(cells[cell_id], state, cache, parquet)
        launcher = driver.launcher(plan="true")
        _, plan_s = timed(lambda: launcher.launch(jobs, 0))
        plan = launcher.plan or {}
        out.update(plan_s=round(plan_s, 3), plan_ms_per_cell=round(1000 * plan_s / len(jobs), 3))
        out["plan_first_s"] = round(out["plan_first_s"], 3)
        out["plan_counts"] = {k: plan.get(k) for k in ("new", "cached", "partial", "failed", "batches")}
        for cell_id in ids:
            fabricate(cells[cell_id], "done", cache, parquet)
        launcher = driver.launcher()
        _, rerun_s = timed(lambda: launcher.launch(jobs, 0))
        out["cached_rerun_s"] = round(rerun_s, 3)
        out["record_write_ms_per_cell"] = round(record_writes(launcher, cells), 4)
        n_report = min(len(ids), 1000) if args.report_cells is None else args.report_cells
        out["report_cells"] = n_report
        if n_report:
            from mmflow.report import build_report

            dirs = [results / cid for cid in ids[:n_report]]
            report_dir = work / "report"
            _, report_s = timed(lambda: build_report(work, report_dir, cell_dirs=dirs))
            _, cached_s = timed(lambda: build_report(work, report_dir, cell_dirs=dirs))
            out.update(report_s=round(report_s, 3), report_cached_s=round(cached_s, 3))
        else:
            out.update(report_s=None, report_cached_s=None)
    finally:
        driver.close()
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    out["driver_peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    out["load_average_1min"] = round(os.getloadavg()[0], 2)
    out["cpus"] = os.cpu_count()
    print(json.dumps(out), flush=True)
    return out


def launcher_jobs(launcher: Any) -> list[Any]:
    return list(launcher.last_jobs)


def record_writes(launcher: Any, cells: dict[str, dict[str, Any]]) -> float:
    """ms per cell of two status changes (running, done) through the sweep's record."""
    sweep = launcher.last_sweep
    started = time.perf_counter()
    for cell_id in cells:
        sweep.record(cell_id, "running", None)
        sweep.record(cell_id, "done", None)
    sweep.events.close()
    return 1000 * (time.perf_counter() - started) / max(len(cells), 1)


if __name__ == "__main__":
    main()
