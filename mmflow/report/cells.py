"""Finished cells read back from their folders: `cell.json` for the config, parquet files for numbers."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import pandas as pd

from mmflow.knockout.spec import NAMED_KNOCKOUTS, KnockoutSpec


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
    def analysis(self) -> str:
        return str(self.config.get("analysis", "knockout"))

    @property
    def model(self) -> str:
        return str(self.config.get("model", {}).get("name", "?"))

    @property
    def task(self) -> str:
        return str(self.config.get("task", "?"))

    @property
    def knockout(self) -> str:
        """The knockout's config name (the analysis kind for cells without a knockout)."""
        knockout = self.config.get("knockout")
        return str(knockout["name"]) if self.analysis == "knockout" and knockout else self.analysis

    @property
    def spec(self) -> KnockoutSpec | None:
        knockout = self.config.get("knockout")
        if self.analysis != "knockout" or not knockout:
            return None
        return KnockoutSpec(knockout["name"], knockout["source"], knockout["target"])

    @property
    def heads(self):
        """`knockout.heads` of a knockout cell (None: every head), else None."""
        knockout = self.config.get("knockout") or {}
        return knockout.get("heads") if self.analysis == "knockout" else None

    @property
    def label(self) -> str:
        """The paper's legend text ("Image ↛ Question"), or the analysis name."""
        spec = self.spec
        if spec is not None:
            heads = self.heads
            if heads is None:
                return spec.label
            return f"{spec.label} ({'per head' if heads == 'each' else f'heads {heads}'})"
        if self.analysis == "patching":
            return f"patching (corruption = {self.config.get('corruption')})"
        lens = self.config.get("lens") if self.analysis == "answer_tracking" else None
        return self.analysis.replace("_", " ") + (f" (lens = {lens})" if lens else "")

    @property
    def window(self) -> int | None:
        window = self.config.get("window")
        return int(window) if window is not None and self.analysis in ("knockout", "patching") else None

    @property
    def n_layers(self) -> int:
        """The model's depth: `model.n_layers` of the config, else the results' highest layer + 1."""
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


def knockout_order(name: str) -> tuple[int, str]:
    """Sort key: the paper's block types in their usual order, then custom ones by name."""
    names = list(NAMED_KNOCKOUTS)
    return (names.index(name), name) if name in names else (len(names), name)


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


def read_meta(cell_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((cell_dir / "cell.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def load_cell(cell_dir: str | Path) -> CellData | None:
    """The cell in `cell_dir` if its status is done and `results.parquet` is there, else None."""
    cell_dir = Path(cell_dir)
    meta = read_meta(cell_dir)
    results_path = cell_dir / "results.parquet"
    if meta.get("status") != "done" or not results_path.exists():
        return None
    return CellData(cell_dir, meta, pd.read_parquet(results_path))


def load_cells(dirs: Iterable[str | Path]) -> tuple[list[CellData], list[dict[str, str]]]:
    """Done cells among `dirs`, and a note (dir, status) for each folder that was left out."""
    cells, left_out = [], []
    for cell_dir in dirs:
        cell = load_cell(cell_dir)
        if cell is None:
            status = read_meta(Path(cell_dir)).get("status", "unreadable")
            left_out.append({"dir": str(cell_dir), "status": str(status)})
        else:
            cells.append(cell)
    cells.sort(key=lambda c: (c.model, c.task, knockout_order(c.knockout), c.window or 0))
    return cells, left_out
