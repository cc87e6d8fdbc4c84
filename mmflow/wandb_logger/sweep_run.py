"""The W&B run of one sweep: cells compared across models on the relative-depth axis.

The launcher calls `log_sweep` once at the end of a sweep. Cells are compared when their analysis
gives a `comparison_key` (knockout: the block type); curves are each analysis's `curve_table`.
"""

from __future__ import annotations

import hashlib
import logging
from collections import defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from mmflow.analyses.curves import curve_minimum
from mmflow.wandb_logger.artifacts import log_figures_artifact
from mmflow.wandb_logger.cell_run import per_layer_table
from mmflow.wandb_logger.settings import (
    image,
    import_wandb,
    init_run,
    logger_config,
    print_sync_hints,
    resolve_mode,
    run_root,
    sweep_name,
)

log = logging.getLogger(__name__)


def log_sweep(
    sweep_dir: str | Path, cell_dirs: Iterable[str | Path], logger_cfg: Mapping[str, Any] | None
) -> Path | None:
    """One sweep-level run comparing models per task and analysis variant on the relative-depth axis,
    with the paper-style figures (images and a `figures` artifact); then the sweep's workspace and
    report specs in `sweep_dir` (`mmflow.wandb_logger.publish`), published at once when online.

    Returns the local folder of the run (None when logging is off or no cell is done) and prints the
    `wandb sync` command when runs were written offline.
    """
    from mmflow.storage.cell_data import load_cells

    cfg = logger_config(logger_cfg)
    if cfg is None:
        return None
    cells, _ = load_cells(cell_dirs)
    cells = [c for c in cells if len(c.results)]
    if not cells:
        return None
    compared = [c for c in cells if c.analysis.comparison_key() is not None]
    sweep_dir = Path(sweep_dir).resolve()
    name = sweep_name(cells[0].config)  # the group of the cells' own runs
    root = run_root(cfg, cells[0].config["results_dir"])  # next to the cells' own runs: one `wandb sync`
    online = resolve_mode(cfg["mode"]) == "online"
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
        if compared:
            _log_comparisons(run, compared)
        paper = _log_paper_figures(run, cells)
        run.finish(exit_code=0)
    except BaseException:
        run.finish(exit_code=1)
        raise
    print_sync_hints(cfg, [root, *(run_root(cfg, c.config["results_dir"]) for c in cells)])
    _write_and_publish(sweep_dir, cells, cfg, name, run.id, paper, online)
    return Path(run.dir).parent


def _log_paper_figures(run: Any, cells: list) -> dict[str, list[str]]:
    """Each analysis's report figures as images (`paper_figure/<stem>`) and as the `figures` artifact."""
    from mmflow.report.figures import png_bytes

    wandb = import_wandb()
    keys: dict[str, list[str]] = {}
    pngs: dict[str, bytes] = {}
    for cls in sorted({type(c.analysis) for c in cells}, key=lambda k: k.name):
        for title, figures in cls.report_sections(cells):
            for spec in figures:
                key = f"paper_figure/{spec.stem}"
                pngs[spec.stem] = png_bytes(spec.figure)
                run.log({key: image(wandb, spec.figure, spec.caption)})
                keys.setdefault(title, []).append(key)
    log_figures_artifact(wandb, run, pngs, [c.cell_id for c in cells])
    return keys


def _write_and_publish(
    sweep_dir: Path, cells: list, cfg: Mapping[str, Any], name: str, run_id: str, paper: dict, online: bool
) -> None:
    """The workspace and report specs in the sweep folder; published when online (never fails the sweep)."""
    from mmflow.wandb_logger.publish import publish, write_specs
    from mmflow.wandb_logger.report_spec import mmflow_commit, mmflow_version, this_command
    from mmflow.wandb_logger.specs import SweepInfo

    info = SweepInfo(
        name=name,
        sweep_dir=str(sweep_dir),
        project=cfg["project"],
        entity=cfg.get("entity") or "",
        sweep_run=run_id,
        command=this_command(),
        version=mmflow_version(),
        commit=mmflow_commit(),
        paper_figures=paper,
    )
    try:
        paths = write_specs(sweep_dir, cells, info)
    except Exception as exc:  # outputs only
        log.warning("W&B workspace/report specs not written: %s: %s", type(exc).__name__, exc)
        return
    if not online:
        print(
            f"[mmflow] W&B workspace and report specs: {paths[0].parent}; after `wandb sync`, create them "
            f"with: mmflow wandb publish {sweep_dir}"
        )
        return
    try:
        record = publish(sweep_dir)
        print(f"[mmflow] W&B workspace: {record['workspace']['url']}")
        print(f"[mmflow] W&B report: {record['report']['url']}")
    except Exception as exc:
        log.warning(
            "W&B workspace/report not published (%s: %s); retry: mmflow wandb publish %s",
            type(exc).__name__,
            exc,
            sweep_dir,
        )


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
