"""The W&B run of one cell: opened and closed where the cell is computed.

The runtime calls `cell_logger(config, n_layers)` (a picklable module-level factory) for every cell it
starts computing; a cached cell gets no logger and logs nothing. Names, curves and the figure come
from the cell's analysis (`mmflow.analyses`): the per-layer table is its `curve_table`, the same
table the report draws.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from mmflow.analyses import Analysis, analysis_for
from mmflow.analyses.curves import curve_minimum
from mmflow.config.identity import cell_id
from mmflow.config.spec import CellSpec, thaw
from mmflow.data.sample import ERRORED
from mmflow.storage.secrets import redact
from mmflow.wandb_logger.artifacts import log_cell_artifact, use_inputs
from mmflow.wandb_logger.keys import facet_key, heads_key
from mmflow.wandb_logger.settings import (
    image,
    import_wandb,
    init_run,
    logger_config,
    resolve_mode,
    run_root,
    supersede_offline_runs,
    sweep_name,
)

log = logging.getLogger(__name__)


def per_layer_table(analysis: Analysis, results: pd.DataFrame, n_layers: int) -> pd.DataFrame:
    """The analysis's curve table with `rel_depth` (layer / n_layers) after `layer`'s block."""
    table = analysis.curve_table(results).copy()
    table.insert(min(3, len(table.columns)), "rel_depth", table["layer"].astype(float) / n_layers)
    return table


def curve_payload(row: Mapping[str, Any]) -> dict[str, Any]:
    """One history row: the layer's numbers against `layer` (curve/*) and `rel_depth` (depth/*)."""
    name = str(row["value"])
    values = {name: row["mean"], f"{name}_ci95_low": row["ci_low"], f"{name}_ci95_high": row["ci_high"]}
    payload: dict[str, Any] = {"layer": int(row["layer"]), "rel_depth": float(row["rel_depth"])}
    payload.update({f"curve/{k}": float(v) for k, v in values.items()})
    payload.update({f"depth/{k}": float(v) for k, v in values.items()})
    payload[f"curve/{name}_n"] = int(row["n"])
    extras = set(row) - {"value", "label", "layer", "rel_depth", "n", "mean", "sem", "ci_low", "ci_high"}
    payload.update({f"curve/{extra}": float(row[extra]) for extra in sorted(extras)})
    return payload


class WandbCellLogger:
    """The W&B run of one cell: streams progress per sample, logs curves, table and figure at the end.

    Every wandb call is guarded: a logging failure is reported once and turns this logger off, it
    never fails the cell.
    """

    def __init__(self, cell: CellSpec | dict[str, Any], n_layers: int, cfg: Mapping[str, Any]) -> None:
        """`cell`: the cell's spec (its id as built; a plain config's id is hashed here)."""
        self.config = cell if isinstance(cell, dict) else cell.config
        self.n_layers = n_layers
        self.cfg = cfg
        self.analysis = analysis_for(self.config)
        self.id = cell_id(cell) if isinstance(cell, dict) else cell.id
        self.counts = {"samples": 0, "correct": 0, "scored": 0}
        self.sums: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(lambda: [0, 0.0]))
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

    def _loaded(self) -> dict[str, Any]:
        """What `cell.json` records of the model as loaded: `model_info` and `window_used`."""
        from mmflow.storage.store import CellStore

        meta = CellStore(self.config["results_dir"], self.config).read_meta()
        return {k: meta[k] for k in ("model_info", "window_used") if meta.get(k) is not None}

    def _open(self) -> Any:
        from mmflow.models.provenance import is_shrunk

        labels = self.analysis.labels
        loaded = self._loaded()
        tags = list(labels.tags)
        if labels.window is not None and "window_used" in loaded:  # the window the cell ran with
            tags = [f"window={loaded['window_used']}" if t == f"window={labels.window}" else t for t in tags]
        info = loaded.get("model_info") or {}
        if info.get("weights") == "random":
            tags.append("shrunk-replica" if is_shrunk(info) else "replica" if info.get("replica_of") else "")
            tags = [t for t in tags if t] + ["random-weights"]
        root = run_root(self.cfg, self.config["results_dir"])
        self.online = resolve_mode(self.cfg["mode"]) == "online"
        if not self.online:
            supersede_offline_runs(root, self.id)
        run = init_run(
            self.cfg,
            root,
            id=self.id,
            name="/".join(labels.tags),
            group=sweep_name(self.config),
            job_type=labels.variant,
            tags=tags,
            config=redact({**self.config, **loaded}),
        )
        try:
            use_inputs(import_wandb(), run, self.config, self.online)
        except Exception as exc:  # lineage is a nicety: the run still logs the cell
            log.warning("W&B inputs of cell %s not declared: %s: %s", self.id, type(exc).__name__, exc)
        return run

    def _seed_from_parts(self) -> None:
        """On resume, count the samples an earlier, interrupted run already recorded."""
        from mmflow.storage.store import CellStore

        parts = CellStore(self.config["results_dir"], self.config).parts  # a relayed batch's scratch copy
        for path in sorted(parts.glob("samples-*.parquet")):
            for row in pd.read_parquet(path).to_dict("records"):
                if row.get("status") != ERRORED:  # computed again in this run, counted then
                    self._count(row)
        for path in sorted(parts.glob("results-*.parquet")):
            self._accumulate(pd.read_parquet(path).to_dict("records"))

    # -------------------------------------------------------- streaming

    def _count(self, row: Mapping[str, Any]) -> None:
        self.counts["samples"] += 1
        self.counts["correct"] += bool(row.get("correct"))
        self.counts["scored"] += row.get("status") == "scored"

    def _accumulate(self, results: list[dict]) -> None:
        for result in results:
            for column in self.analysis.value_columns:
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
            if by_layer and column == self.analysis.minimum_of:
                layer = min(by_layer, key=by_layer.get)
                payload[f"progress/running_min_{column}"] = by_layer[layer]
                payload["progress/running_min_layer"] = layer
        every = int(self.cfg.get("curve_every") or 0)
        if curve and every and (done % every == 0 or done == total):
            payload["progress/running_curve"] = self._curve_plot(curve, done)
        self.run.log(payload)

    def _curve_plot(self, curve: dict[str, dict[int, float]], done: int) -> Any:
        wandb = import_wandb()
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
        rows: dict[int, dict[str, Any]] = {}  # one history row per layer (every curve of the analysis)
        for row in table.to_dict("records"):
            payload = curve_payload(row)
            payload[facet_key(self.config, str(row["value"]))] = float(row["mean"])  # the dashboards' key
            rows.setdefault(int(row["layer"]), {}).update(payload)
        for layer in sorted(rows):
            self.run.log(rows[layer])
        wandb = import_wandb()
        self.run.log({"per_layer": wandb.Table(dataframe=table)})
        if "head" in results:  # knockout.heads: each: the heat map's numbers, layer x head
            means = (  # n: the samples behind each (layer, head) mean
                results.groupby(["layer", "head"])["rel_change_pct"]
                .agg(rel_change_pct="mean", n="count")
                .reset_index()
            )
            heads = wandb.Table(dataframe=means)
            self.run.log({"per_layer_head": heads, heads_key(self.config): heads})
        self.run.summary.update(self._summary(table, summary))
        figure = self._figure(results)
        if figure is not None:
            caption = f"{self.config['model']['name']} — {self.config['task']}"
            self.run.log({"figure": image(wandb, figure, caption)})
        log_cell_artifact(wandb, self.run, self.config, Path(self.config["results_dir"]) / self.id, self.id)

    def _summary(self, table: pd.DataFrame, summary: Mapping[str, Any]) -> dict[str, Any]:
        counts = dict(summary.get("counts", {}))
        skipped = counts.pop("skipped", {}) or {}
        out: dict[str, Any] = {f"counts/{k}": v for k, v in counts.items()}
        out["counts/skipped"] = int(sum(skipped.values()))
        out.update({f"counts/skipped/{k}": v for k, v in skipped.items()})
        out.update({k: v for k, v in summary.get("headline", {}).items() if isinstance(v, int | float | str)})
        out.update(n_layers=self.n_layers, status="done")
        if "engine" in summary:  # which engine ran (a fallback says so) and the cell's noise floor
            out["engine"] = str(summary["engine"])
        floor = (summary.get("noise_floor") or {}).get("rel_change_pct")
        if floor is not None:
            out["noise_floor_pct"] = float(floor)
        value = self.analysis.minimum_of
        best = curve_minimum(table, value) if value is not None and len(table) else {}
        for key, number in best.items():  # the analysis's own headline wins (per head: its (layer, head))
            out.setdefault(key, number)
        if best:
            out["min_rel_depth"] = out["min_layer"] / self.n_layers
        return out

    def _figure(self, results: pd.DataFrame) -> Any:
        from mmflow.storage.cell_data import CellData

        meta = {"config": self.config, "cell_id": self.id, "status": "done", **self._loaded()}
        return self.analysis.figure(CellData(Path(self.config["results_dir"]) / self.id, meta, results))


def cell_logger(cell: CellSpec | dict[str, Any], n_layers: int) -> WandbCellLogger | None:
    """The runtime's logger factory: a W&B run for this cell (its spec), or None when logging is off."""
    config = cell if isinstance(cell, dict) else cell.plain
    cfg = logger_config(thaw(config.get("logger")))
    return WandbCellLogger(cell, n_layers, cfg) if cfg is not None else None
