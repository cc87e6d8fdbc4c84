"""Finished cells read back from their folders (`CellData`): `cell.json` for the config, parquet files
for numbers. The report, the W&B logger and the sweep's curve printout all read cells through here."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import pandas as pd

from mmflow.analyses import Analysis, analysis_for
from mmflow.analyses.base import DEFAULT_ANALYSIS


@dataclass
class CellData:
    """One done cell: its folder, `cell.json` and `results.parquet` (samples read on demand)."""

    dir: Path
    meta: dict[str, Any]
    results: pd.DataFrame = field(repr=False)

    @property
    def config(self) -> dict[str, Any]:
        return self.meta.get("config", {})

    @property
    def cell_id(self) -> str:
        return str(self.meta.get("cell_id", self.dir.name))

    @property
    def kind(self) -> str:
        """The name of the cell's analysis (its config's `analysis` key)."""
        return str(self.config.get("analysis", DEFAULT_ANALYSIS))

    @cached_property
    def analysis(self) -> Analysis:
        """The cell's analysis plug-in (names, curves, figures); ValueError if it is not installed."""
        return analysis_for(self.config)

    @property
    def model(self) -> str:
        return str(self.config.get("model", {}).get("name", "?"))

    @property
    def task(self) -> str:
        return str(self.config.get("task", "?"))

    @property
    def variant(self) -> str:
        """What tells this cell apart from others of its analysis, model and task (`Labels.variant`)."""
        return self.analysis.labels.variant

    @property
    def label(self) -> str:
        """The paper's legend text ("Image ↛ Question"), or the analysis's own (`Labels.legend`)."""
        return self.analysis.labels.legend

    @property
    def weights_note(self) -> str:
        """ "" for trained weights, else how they are marked ("shrunk replica, 2 of 32 layers, random
        weights", "random weights"), from `cell.json`'s `model_info` (`mmflow.models.provenance`)."""
        from mmflow.models.provenance import weights_note

        return weights_note(self.meta.get("model_info"))

    @property
    def model_title(self) -> str:
        """The model's config name, with its weights marked when they are a replica's or random."""
        return f"{self.model} [{self.weights_note}]" if self.weights_note else self.model

    @property
    def model_legend(self) -> str:
        """Family and size for legends ("LLaVA-1.6 (Mistral) 7B"), else the model's config name;
        replicas and random weights marked."""
        model = self.config.get("model", {})
        family, size = model.get("family"), model.get("size")
        name = f"{family} {size}" if family and size else self.model
        return f"{name} [{self.weights_note}]" if self.weights_note else name

    @property
    def window(self) -> int | None:
        """The window the cell ran with (`cell.json`'s `window_used`, checked against the loaded
        depth), else its configured one."""
        used = self.meta.get("window_used")
        return int(used) if isinstance(used, int) else self.analysis.labels.window

    @property
    def n_layers(self) -> int:
        """The depth of the model the cell ran on (`cell.json`'s `model_info`), else `model.n_layers`
        of the config, else the results' highest layer + 1."""
        loaded = (self.meta.get("model_info") or {}).get("n_layers")
        if loaded:
            return int(loaded)
        configured = self.config.get("model", {}).get("n_layers")
        if configured:
            return int(configured)
        return int(self.results["layer"].max()) + 1 if len(self.results) else 1

    @cached_property
    def samples(self) -> pd.DataFrame:
        path = self.dir / "samples.parquet"
        return pd.read_parquet(path) if path.exists() else pd.DataFrame(columns=["status", "correct"])

    @property
    def counts(self) -> dict[str, int]:
        """samples, correct, scored: from samples.parquet, else from cell.json."""
        samples = self.samples
        if len(samples):
            return {
                "samples": int(len(samples)),
                "correct": int(samples["correct"].fillna(False).astype(bool).sum()),
                "scored": int((samples["status"] == "scored").sum()),
            }
        counts = self.meta.get("counts", {})
        return {k: int(counts.get(k, 0)) for k in ("samples", "correct", "scored")}


def find_cell_dirs(root: str | Path) -> list[Path]:
    """Every folder at or below `root` that holds a `cell.json`, plus the cells a `sweep.json` in
    `root` lists (a sweep folder records its cells, which live in the results folder), sorted."""
    root = Path(root)
    found = {path.parent.resolve() for path in root.rglob("cell.json")}
    sweep = root / "sweep.json"
    if sweep.exists():
        try:
            listed = json.loads(sweep.read_text()).get("cells", [])
        except (OSError, json.JSONDecodeError):
            listed = []
        found |= {Path(c["path"]).resolve() for c in listed if c.get("path")}
    return sorted(found)


def read_meta(cell_dir: str | Path) -> dict[str, Any]:
    """The cell's `cell.json`, or {} when it cannot be read or is not a JSON object."""
    try:
        meta = json.loads((Path(cell_dir) / "cell.json").read_text())
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def load_cell(cell_dir: str | Path) -> CellData | None:
    """The cell in `cell_dir` if its status is done, `results.parquet` is there and its analysis is
    installed, else None."""
    cell_dir = Path(cell_dir)
    meta = read_meta(cell_dir)
    results_path = cell_dir / "results.parquet"
    if meta.get("status") != "done" or not results_path.exists():
        return None
    cell = CellData(cell_dir, meta, pd.read_parquet(results_path))
    try:
        cell.analysis  # noqa: B018 - resolves the plug-in once
    except ValueError:
        return None
    return cell


def load_cells(dirs: Iterable[str | Path]) -> tuple[list[CellData], list[dict[str, str]]]:
    """Done cells among `dirs`, and a note (dir, status) for each folder that was left out (a cell of
    an analysis that is not installed: status `done, analysis <name> unknown`)."""
    cells, left_out = [], []
    for cell_dir in dirs:
        cell = load_cell(cell_dir)
        if cell is None:
            meta = read_meta(Path(cell_dir))
            status = str(meta.get("status", "unreadable"))
            if status == "done" and (Path(cell_dir) / "results.parquet").exists():
                kind = meta.get("config", {}).get("analysis", DEFAULT_ANALYSIS)
                status = f"done, analysis {kind!r} unknown"
            left_out.append({"dir": str(cell_dir), "status": status})
        else:
            cells.append(cell)
    cells.sort(key=lambda c: (c.model, c.task, c.kind, c.analysis.labels.order))
    return cells, left_out
