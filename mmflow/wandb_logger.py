"""Weights & Biases logging: one run per cell, opened and closed where the cell is computed, one per sweep.

Config (`conf/logger/wandb.yaml`): `project`, `entity`, `mode` (auto | online | offline | disabled),
`dir` (default: the results folder), `curve_every`. `mode: auto` is online when `WANDB_API_KEY` is set
and offline otherwise; `WANDB_MODE=offline` (or `disabled`) in the environment always wins. The API key
is read by wandb from the environment only: nothing here reads, stores or prints it.

The runtime calls `cell_logger(config, n_layers)` (a picklable module-level factory) for every cell it
starts computing; a cached cell gets no logger and logs nothing. The launcher calls `log_sweep` once
at the end of a sweep.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from mmflow.store import cell_id

log = logging.getLogger(__name__)

DEFAULTS: dict[str, Any] = {
    "name": "wandb",
    "project": "mmflow",
    "entity": None,
    "mode": "auto",
    "dir": None,
    "curve_every": 10,
}
MODES = ("auto", "online", "offline", "disabled")
# Metric namespaces and the x-axis each is charted against.
STEP_METRICS = {
    "progress/*": "samples_done",
    "running_curve/*": "samples_done",
    "curve/*": "layer",
    "depth/*": "rel_depth",
}


# ---------------------------------------------------------------- configuration


def logger_config(raw: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The logger section merged with the defaults; None when W&B logging is off."""
    if raw is None:
        return None
    from omegaconf import DictConfig, OmegaConf

    if isinstance(raw, DictConfig):
        raw = OmegaConf.to_container(raw, resolve=True)
    cfg = {**DEFAULTS, **{k: v for k, v in dict(raw).items() if v is not None}}
    if cfg["name"] != "wandb":
        return None
    if cfg["mode"] not in MODES:
        raise ValueError(f"logger.mode must be one of {MODES}, got {cfg['mode']!r}")
    return None if resolve_mode(cfg["mode"]) == "disabled" else cfg


def resolve_mode(mode: str = "auto", environ: Mapping[str, str] | None = None) -> str:
    """online | offline | disabled from the configured mode, `WANDB_MODE` and whether a key is set."""
    env = os.environ if environ is None else environ
    forced = env.get("WANDB_MODE", "").strip().lower()
    if mode == "disabled" or forced == "disabled":
        return "disabled"
    if mode == "offline" or forced in {"offline", "dryrun"}:
        return "offline"
    if env.get("WANDB_API_KEY"):
        return "online"
    if mode == "online":
        log.warning("logger.mode=online but WANDB_API_KEY is not set: writing W&B runs offline")
    return "offline"


def sweep_name(config: Mapping[str, Any]) -> str:
    """The W&B group: `sweep_name` if the config has one, else the results folder's name."""
    return str(config.get("sweep_name") or Path(config.get("results_dir", "results")).name)


def run_root(cfg: Mapping[str, Any], default: str | Path) -> Path:
    """The folder wandb writes into (`<it>/wandb/...`): `logger.dir`, else `default`."""
    return Path(cfg.get("dir") or default).resolve()


def sync_command(root: str | Path) -> str:
    return f"wandb sync {Path(root) / 'wandb'}"


def sync_hint(config: Mapping[str, Any]) -> str | None:
    """The `wandb sync` line to print after a single run whose W&B runs were written offline."""
    cfg = logger_config(config.get("logger"))
    if cfg is None or resolve_mode(cfg["mode"]) != "offline":
        return None
    root = run_root(cfg, config["results_dir"])
    return f"[mmflow] W&B runs were written offline; upload them with: {sync_command(root)}"


def _wandb() -> Any:
    """Import wandb with its console output turned down."""
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("WANDB_CONSOLE", "off")
    import wandb

    return wandb


def _settings(wandb: Any) -> Any:
    return wandb.Settings(
        silent=True,
        quiet=True,
        show_info=False,
        console="off",
        x_disable_stats=True,
        disable_git=True,
        save_code=False,
        x_save_requirements=False,
        disable_job_creation=True,
    )


def init_run(cfg: Mapping[str, Any], root: Path, **kwargs: Any) -> Any:
    """`wandb.init` of a new, independent run (never reusing another) that resumes its id if it exists."""
    wandb = _wandb()
    root.mkdir(parents=True, exist_ok=True)
    run = wandb.init(
        project=cfg["project"],
        entity=cfg.get("entity"),
        dir=str(root),
        mode=resolve_mode(cfg["mode"]),
        resume="allow",
        reinit="create_new",
        settings=_settings(wandb),
        **kwargs,
    )
    for step in sorted(set(STEP_METRICS.values())):
        run.define_metric(step, hidden=True, summary="none")
    for pattern, step in STEP_METRICS.items():
        # Curves are per layer: their "last value" would be the last layer's, so no summary for them.
        run.define_metric(pattern, step_metric=step, summary=None if pattern == "progress/*" else "none")
    return run


def _image(wandb: Any, figure: Any, caption: str) -> Any:
    from PIL import Image

    from mmflow.report.figures import png_bytes

    return wandb.Image(Image.open(io.BytesIO(png_bytes(figure))), caption=caption)


# ---------------------------------------------------------------- one cell


def value_columns(analysis: str, keys: Iterable[str]) -> list[str]:
    """The per-layer values a cell's curve is made of: rel_change_pct, or the answer probabilities."""
    keys = list(keys)
    if analysis == "knockout":
        return ["rel_change_pct"]
    if analysis == "patching":
        return []  # per restored group: logged at the end (`per_layer_table`), no running mean over groups
    return [k for k in keys if k.startswith("p_") and k not in {"p_base", "p_new"}]


class WandbCellLogger:
    """The W&B run of one cell: streams progress per sample, logs curves, table and figure at the end.

    Every wandb call is guarded: a logging failure is reported once and turns this logger off, it
    never fails the cell.
    """

    def __init__(self, config: dict[str, Any], n_layers: int, cfg: Mapping[str, Any]) -> None:
        self.config = config
        self.n_layers = n_layers
        self.cfg = cfg
        self.analysis = str(config.get("analysis", "knockout"))
        self.id = cell_id(config)
        self.counts = {"samples": 0, "correct": 0, "scored": 0}
        self.sums: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(lambda: [0, 0.0]))
        self.columns: list[str] | None = None
        self.finished = False
        self.run = self._guard(self._open)
        if self.run is not None:
            self._guard(self._seed_from_parts)

    # -------------------------------------------------------- plumbing

    def _guard(self, fn: Callable[..., Any], *args: Any) -> Any:
        if self.finished:
            return None
        try:
            return fn(*args)
        except Exception as exc:  # W&B must never fail a cell
            log.warning("W&B logging of cell %s turned off: %s: %s", self.id, type(exc).__name__, exc)
            self._abandon()
            return None

    def _abandon(self) -> None:
        run, self.run, self.finished = getattr(self, "run", None), None, True
        if run is not None:
            try:
                run.finish(exit_code=1)
            except Exception:  # already broken
                pass

    def _open(self) -> Any:
        config = self.config
        knockout = config.get("knockout") or {}
        job_type = knockout.get("name") if self.analysis == "knockout" else self.analysis
        third = f"window={config.get('window')}" if self.analysis == "knockout" else self.analysis
        tags = [str(config["model"]["name"]), str(config["task"]), third]
        return init_run(
            self.cfg,
            run_root(self.cfg, config["results_dir"]),
            id=self.id,
            name="/".join(tags),
            group=sweep_name(config),
            job_type=str(job_type),
            tags=tags,
            config=config,
        )

    def _seed_from_parts(self) -> None:
        """On resume, count the samples an earlier, interrupted run already recorded."""
        parts = Path(self.config["results_dir"]) / self.id / "parts"
        for path in sorted(parts.glob("samples-*.parquet")):
            for row in pd.read_parquet(path).to_dict("records"):
                self._count(row)
        for path in sorted(parts.glob("results-*.parquet")):
            self._accumulate(pd.read_parquet(path).to_dict("records"))

    # -------------------------------------------------------- streaming

    def _count(self, row: Mapping[str, Any]) -> None:
        self.counts["samples"] += 1
        self.counts["correct"] += bool(row.get("correct"))
        self.counts["scored"] += row.get("status") == "scored"

    def _accumulate(self, results: list[dict]) -> None:
        if not results:
            return
        if self.columns is None:
            self.columns = value_columns(self.analysis, results[0].keys())
        for result in results:
            for column in self.columns:
                value = result.get(column)
                if value is not None and value == value:  # skips None and NaN
                    total = self.sums[column][int(result["layer"])]
                    total[0] += 1
                    total[1] += float(value)

    def running_curve(self) -> dict[str, dict[int, float]]:
        """Mean per layer of every value column over the samples so far."""
        return {
            column: {layer: s / n for layer, (n, s) in sorted(by_layer.items()) if n}
            for column, by_layer in self.sums.items()
        }

    def sample(self, row: Mapping[str, Any], results: list[dict]) -> None:
        """After each sample: samples done, correct and scored so far, the running mean curve."""
        self._count(row)
        self._accumulate(results)
        self._guard(self._log_progress)

    def _log_progress(self) -> None:
        done = self.counts["samples"]
        total = int(self.config.get("n_samples") or 0)
        payload: dict[str, Any] = {"samples_done": done, "progress/samples_done": done}
        payload.update({"progress/correct": self.counts["correct"], "progress/scored": self.counts["scored"]})
        if total:
            payload["progress/fraction_done"] = done / total
        curve = self.running_curve()
        for column, by_layer in curve.items():
            payload.update({f"running_curve/{column}/layer_{layer:02d}": v for layer, v in by_layer.items()})
            if by_layer and self.analysis == "knockout":
                layer = min(by_layer, key=by_layer.get)
                payload["progress/running_min_rel_change_pct"] = by_layer[layer]
                payload["progress/running_min_layer"] = layer
        every = int(self.cfg.get("curve_every") or 0)
        if curve and every and (done % every == 0 or done == total):
            payload["progress/running_curve"] = self._curve_plot(curve, done)
        self.run.log(payload)

    def _curve_plot(self, curve: dict[str, dict[int, float]], done: int) -> Any:
        wandb = _wandb()
        columns = list(curve)
        layers = sorted(curve[columns[0]])
        return wandb.plot.line_series(
            xs=layers,
            ys=[[curve[c].get(layer) for layer in layers] for c in columns],
            keys=columns,
            title=f"Running mean per layer after {done} sample(s)",
            xname="layer",
        )

    # -------------------------------------------------------- end of cell

    def finish(self, samples: pd.DataFrame, results: pd.DataFrame, summary: Mapping[str, Any]) -> None:
        """Log the per-layer curves, the table, the summary and the figure; close the run."""
        self._guard(self._log_final, samples, results, summary)
        if self.run is not None and not self.finished:
            self._guard(self.run.finish, 0)
            self.finished = True

    def close(self) -> None:
        """Finish the run if `finish` did not (an interrupted or failed cell: exit code 1)."""
        if not self.finished:
            self._abandon()

    def _log_final(self, samples: pd.DataFrame, results: pd.DataFrame, summary: Mapping[str, Any]) -> None:
        table = per_layer_table(self.analysis, results, self.n_layers)
        rows: dict[int, dict[str, Any]] = {}  # one history row per layer (all forms of answer tracking)
        for row in table.to_dict("records"):
            rows.setdefault(int(row["layer"]), {}).update(_curve_payload(row, self.analysis))
        for layer in sorted(rows):
            self.run.log(rows[layer])
        wandb = _wandb()
        self.run.log({"per_layer": wandb.Table(dataframe=table)})
        if "head" in results:  # knockout.heads: each: the heat map's numbers, layer x head
            means = results.groupby(["layer", "head"])["rel_change_pct"].mean().reset_index()
            self.run.log({"per_layer_head": wandb.Table(dataframe=means)})
        self.run.summary.update(self._summary(table, summary))
        figure = self._figure(results)
        if figure is not None:
            caption = f"{self.config['model']['name']} — {self.config['task']}"
            self.run.log({"figure": _image(wandb, figure, caption)})

    def _summary(self, table: pd.DataFrame, summary: Mapping[str, Any]) -> dict[str, Any]:
        counts = dict(summary.get("counts", {}))
        skipped = counts.pop("skipped", {}) or {}
        out: dict[str, Any] = {f"counts/{k}": v for k, v in counts.items()}
        out["counts/skipped"] = int(sum(skipped.values()))
        out.update({f"counts/skipped/{k}": v for k, v in skipped.items()})
        out.update({k: v for k, v in summary.get("headline", {}).items() if isinstance(v, int | float | str)})
        out.update(n_layers=self.n_layers, status="done")
        per_head = ((self.config.get("knockout") or {}).get("heads")) == "each"
        if (
            self.analysis == "knockout" and len(table) and not per_head
        ):  # per head: the headline's (layer, head)
            best = table.loc[table["mean"].idxmin()]
            out.update(
                min_rel_change_pct=float(best["mean"]),
                min_layer=int(best["layer"]),
                min_rel_depth=float(best["rel_depth"]),
            )
        return out

    def _figure(self, results: pd.DataFrame) -> Any:
        from mmflow.report.cells import CellData
        from mmflow.report.figures import plot_cell

        meta = {"config": self.config, "cell_id": self.id, "status": "done"}
        return plot_cell(CellData(Path(self.config["results_dir"]) / self.id, meta, results))


def per_layer_table(analysis: str, results: pd.DataFrame, n_layers: int) -> pd.DataFrame:
    """The per-layer numbers W&B logs: mean, sem, 95% interval (and extras) per layer (and form)."""
    from mmflow.report.figures import curve_stats

    if not len(results):
        return pd.DataFrame(columns=["layer", "rel_depth", "n", "mean", "sem", "ci_low", "ci_high"])
    if analysis == "knockout":
        table = curve_stats(results)
        extras = {"logp_change": "logp_change", "top1_changed": "top1_changed_frac"}
        for column, name in extras.items():
            if column in results:
                means = results.groupby("layer")[column].mean().astype(float)
                table = table.join(means.rename(name), on="layer")
    else:
        table = _probability_table(analysis, results)
    table.insert(1, "rel_depth", table["layer"] / n_layers)
    return table


def _probability_table(analysis: str, results: pd.DataFrame) -> pd.DataFrame:
    """Answer tracking: the analysis's own curves table if it has one, else mean ± 95% of each p_* (%).
    Patching: the recovered fraction (%) per restored group (`recovered_pct/<group>`)."""
    if analysis == "patching":
        from mmflow.report.patching import patching_curves

        curves = patching_curves(results)
        return curves.assign(value="recovered_pct/" + curves["group"])[
            ["layer", "n", "mean", "ci_low", "ci_high", "value", "group"]
        ]
    if analysis == "answer_tracking":
        try:
            from mmflow.analyses.answer_tracking import answer_tracking_curves
        except ImportError:
            pass
        else:
            curves = answer_tracking_curves(results)
            renamed = {"mean_pct": "mean", "low_pct": "ci_low", "high_pct": "ci_high"}
            curves = curves.rename(columns=renamed).assign(value=lambda t: "p_" + t["form"] + "_pct")
            return curves[["layer", "n", "mean", "ci_low", "ci_high", "value", "label"]]
    from mmflow.report.figures import curve_stats

    frames = [
        curve_stats(results.assign(_v=results[c] * 100.0), "_v").assign(value=f"{c}_pct")
        for c in value_columns(analysis, results.columns)
        if results[c].notna().any()
    ]
    return pd.concat(frames, ignore_index=True)


def _curve_payload(row: Mapping[str, Any], analysis: str) -> dict[str, Any]:
    """One history row: the layer's numbers against `layer` (curve/*) and `rel_depth` (depth/*)."""
    name = "rel_change_pct" if analysis == "knockout" else str(row["value"])
    values = {name: row["mean"], f"{name}_ci95_low": row["ci_low"], f"{name}_ci95_high": row["ci_high"]}
    payload: dict[str, Any] = {"layer": int(row["layer"]), "rel_depth": float(row["rel_depth"])}
    payload.update({f"curve/{k}": float(v) for k, v in values.items()})
    payload.update({f"depth/{k}": float(v) for k, v in values.items()})
    payload[f"curve/{name}_n"] = int(row["n"])
    for extra in ("logp_change", "top1_changed_frac"):
        if extra in row:
            payload[f"curve/{extra}"] = float(row[extra])
    return payload


def cell_logger(config: dict[str, Any], n_layers: int) -> WandbCellLogger | None:
    """The runtime's logger factory: a W&B run for this cell, or None when logging is off."""
    cfg = logger_config(config.get("logger"))
    return WandbCellLogger(config, n_layers, cfg) if cfg is not None else None


# ---------------------------------------------------------------- one sweep


def log_sweep(
    sweep_dir: str | Path, cell_dirs: Iterable[str | Path], logger_cfg: Mapping[str, Any] | None
) -> Path | None:
    """One sweep-level run comparing models per task and knockout on the relative-depth axis.

    Returns the local folder of the run (None when logging is off or no cell is done) and prints
    the `wandb sync` command when runs were written offline.
    """
    from mmflow.report.cells import load_cells

    cfg = logger_config(logger_cfg)
    if cfg is None:
        return None
    cells, _ = load_cells(cell_dirs)
    cells = [c for c in cells if c.analysis == "knockout" and len(c.results) and c.heads != "each"]
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
    _print_sync_hints(cfg, [root, *(run_root(cfg, c.config["results_dir"]) for c in cells)])
    return Path(run.dir).parent


def _sweep_config(sweep_dir: Path, cells: list) -> dict[str, Any]:
    return {
        "sweep_dir": str(sweep_dir),
        "n_cells": len(cells),
        "cells": [c.cell_id for c in cells],
        "models": sorted({c.model for c in cells}),
        "tasks": sorted({c.task for c in cells}),
        "knockouts": sorted({c.knockout for c in cells}),
    }


def _log_comparisons(run, cells: list) -> None:
    from mmflow.report.figures import plot_cross_model

    wandb = _wandb()
    groups: dict[tuple[str, str], list] = defaultdict(list)
    for cell in cells:
        groups[(cell.task, cell.knockout)].append(cell)
    frames = []
    for (task, knockout), group in sorted(groups.items()):
        curves = [(c, per_layer_table("knockout", c.results, c.n_layers)) for c in group]
        plot = wandb.plot.line_series(
            xs=[t["rel_depth"].tolist() for _, t in curves],
            ys=[t["mean"].tolist() for _, t in curves],
            keys=[f"{c.model} (L={c.n_layers}, k={c.window})" for c, _ in curves],
            title=f"{group[0].label} — {task}: relative change (%) by relative depth",
            xname="relative depth (layer / L)",
        )
        image = _image(wandb, plot_cross_model(group), f"{group[0].label} — {task}")
        run.log({f"compare/{task}/{knockout}": plot, f"compare_figure/{task}/{knockout}": image})
        for cell, table in curves:
            frames.append(table.assign(model=cell.model, task=task, knockout=knockout, window=cell.window))
            key = f"min_rel_change_pct/{task}/{knockout}/{cell.model}/k{cell.window}"
            run.summary[key] = float(table["mean"].min())
    run.log({"curves": wandb.Table(dataframe=pd.concat(frames, ignore_index=True))})
    run.summary["n_cells"] = len(cells)


def _print_sync_hints(cfg: Mapping[str, Any], roots: Iterable[Path]) -> None:
    if resolve_mode(cfg["mode"]) != "offline":
        return
    for root in sorted({r for r in roots if (r / "wandb").exists()}):
        print(f"[mmflow] W&B runs were written offline; upload them with: {sync_command(root)}")
