"""The W&B run of one sweep: cells compared across models on the relative-depth axis.

The launcher calls `log_sweep` once at the end of a sweep. Cells are compared when their analysis
gives a `comparison_key` (knockout: the block type); curves are each analysis's `curve_table`.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from mmflow.analyses.curves import curve_minimum
from mmflow.wandb_logger.cell_run import per_layer_table
from mmflow.wandb_logger.settings import (
    image,
    import_wandb,
    init_run,
    logger_config,
    print_sync_hints,
    run_root,
    sweep_name,
)


def log_sweep(
    sweep_dir: str | Path, cell_dirs: Iterable[str | Path], logger_cfg: Mapping[str, Any] | None
) -> Path | None:
    """One sweep-level run comparing models per task and analysis variant on the relative-depth axis.

    Returns the local folder of the run (None when logging is off or no compared cell is done) and
    prints the `wandb sync` command when runs were written offline.
    """
    from mmflow.report.cells import load_cells

    cfg = logger_config(logger_cfg)
    if cfg is None:
        return None
    cells, _ = load_cells(cell_dirs)
    cells = [c for c in cells if c.analysis.comparison_key() is not None and len(c.results)]
    if not cells:
        return None
    sweep_dir = Path(sweep_dir).resolve()
    name = sweep_name(cells[0].config)  # the group of the cells' own runs
    root = run_root(cfg, cells[0].config["results_dir"])  # next to the cells' own runs: one `wandb sync`
    run = init_run(
        cfg,
        root,
        id="sweep-" + hashlib.sha1(str(sweep_dir).encode()).hexdigest()[:12],
        name=f"sweep {name}",
        group=name,
        job_type="sweep",
        tags=sorted({c.model for c in cells}),
        config=_sweep_config(sweep_dir, cells),
    )
    try:
        _log_comparisons(run, cells)
        run.finish(exit_code=0)
    except BaseException:
        run.finish(exit_code=1)
        raise
    print_sync_hints(cfg, [root, *(run_root(cfg, c.config["results_dir"]) for c in cells)])
    return Path(run.dir).parent


def _sweep_config(sweep_dir: Path, cells: list) -> dict[str, Any]:
    return {
        "sweep_dir": str(sweep_dir),
        "n_cells": len(cells),
        "cells": [c.cell_id for c in cells],
        "models": sorted({c.model for c in cells}),
        "tasks": sorted({c.task for c in cells}),
        "variants": sorted({c.variant for c in cells}),
    }


def _log_comparisons(run, cells: list) -> None:
    wandb = import_wandb()
    compared: dict[tuple[str, str, str], list] = defaultdict(list)
    for cell in cells:
        compared[(cell.kind, cell.task, cell.analysis.comparison_key())].append(cell)
    frames = []
    for (_, task, key), same in sorted(compared.items()):
        analysis = same[0].analysis
        curves = [(c, per_layer_table(c.analysis, c.results, c.n_layers)) for c in same]
        value = analysis.minimum_of or str(curves[0][1]["value"].iloc[0])
        curves = [(c, t[t["value"] == value]) for c, t in curves]
        plot = wandb.plot.line_series(
            xs=[t["rel_depth"].tolist() for _, t in curves],
            ys=[t["mean"].tolist() for _, t in curves],
            keys=[f"{c.model_legend} (L={c.n_layers}{_window(c, ', k=')})" for c, _ in curves],
            title=f"{same[0].label} — {task}: {value} by relative depth",
            xname="relative depth (layer / L)",
        )
        logged = {f"compare/{task}/{key}": plot}
        figure = type(analysis).plot_comparison(same)
        if figure is not None:
            logged[f"compare_figure/{task}/{key}"] = image(wandb, figure, f"{same[0].label} — {task}")
        run.log(logged)
        for cell, table in curves:
            frames.append(table.assign(model=cell.model, task=task, variant=key, window=cell.window))
            minimum = curve_minimum(table, value)[f"min_{value}"]
            run.summary[f"min_{value}/{task}/{key}/{cell.model}{_window(cell, '/k')}"] = minimum
    run.log({"curves": wandb.Table(dataframe=pd.concat(frames, ignore_index=True))})
    run.summary["n_cells"] = len(cells)


def _window(cell, prefix: str) -> str:
    return f"{prefix}{cell.window}" if cell.window is not None else ""
