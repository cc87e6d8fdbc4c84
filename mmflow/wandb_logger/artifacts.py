"""W&B artifacts with lineage: a cell's parquet files from its inputs, a sweep's figures from its cells.

- `cell-<cell id>` (type `cell-results`): `results.parquet`, `samples.parquet`, `cell.json` of one
  cell, logged by the cell's run. Its metadata names the inputs: the data (`data-<source>-<digest>`,
  the digest of the data file for `data=table`) and the model (`model-<checkpoint>[-<revision>]`).
- `figures-<sweep run id>` (type `figures`): the sweep's comparison figures (PNG), logged by the
  sweep run; its metadata lists the cells (`cell-<id>`).

The data and model artifacts hold one JSON file describing the input, so the same input is the same
artifact version. An online cell run declares them with `run.use_artifact`; W&B refuses that in
offline runs, so there the inputs are in the metadata and `mmflow wandb publish` declares them after
`wandb sync` (`mmflow.wandb_logger.lineage`), as it declares the cells inputs of the sweep run. Then
W&B's lineage view leads from a figure to its cells and their inputs.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mmflow.config.identity import cell_id
from mmflow.wandb_logger.keys import data_input, model_input

CELL_FILES = ("results.parquet", "samples.parquet", "cell.json")


def cell_artifact_name(cell: str) -> str:
    return f"cell-{cell}"


def inputs(config: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The data and model a cell was computed from (see `mmflow.wandb_logger.keys`)."""
    return {"data": data_input(config), "model": model_input(config)}


def input_artifact(wandb: Any, kind: str, described: Mapping[str, Any]) -> Any:
    """A draft artifact (type `dataset` or `model`) holding one JSON file that describes the input."""
    artifact = wandb.Artifact(described["artifact"], type="dataset" if kind == "data" else "model")
    artifact.metadata.update({k: v for k, v in described.items() if k != "artifact"})
    with artifact.new_file(f"{kind}.json", mode="w") as handle:
        json.dump(described, handle, sort_keys=True, default=str, indent=1)
    return artifact


def use_inputs(wandb: Any, run: Any, config: Mapping[str, Any], online: bool) -> list[str]:
    """Declare the cell's inputs on its run (online only: W&B has no `use_artifact` offline)."""
    if not online:
        return []
    used = []
    for kind, described in inputs(config).items():
        run.use_artifact(input_artifact(wandb, kind, described))
        used.append(described["artifact"])
    return used


def log_cell_artifact(
    wandb: Any, run: Any, config: Mapping[str, Any], cell_dir: Path, ident: str | None = None
) -> Any:
    """Log the cell's files as `cell-<id>`, an output of its run, naming its inputs in the metadata.
    `ident`: the cell id when the caller has it (its spec's); else hashed from `config`."""
    ident = ident or cell_id(config)
    artifact = wandb.Artifact(cell_artifact_name(ident), type="cell-results")
    artifact.metadata.update(
        cell_id=ident,
        model=config["model"]["name"],
        task=config.get("task"),
        analysis=config.get("analysis", "knockout"),
        inputs=inputs(config),
    )
    for name in CELL_FILES:
        if (cell_dir / name).exists():
            artifact.add_file(str(cell_dir / name), name=name)
    return run.log_artifact(artifact, aliases=["latest"])


def log_figures_artifact(wandb: Any, run: Any, figures: Mapping[str, bytes], cells: list[str]) -> Any | None:
    """Log the sweep's figures (PNG bytes by file stem) as `figures-<run id>`, built from `cells`.

    The metadata lists the cells' artifacts; publishing declares them inputs of the sweep run
    (`mmflow.wandb_logger.lineage`), online and offline alike.
    """
    if not figures:
        return None
    artifact = wandb.Artifact(f"figures-{run.id}", type="figures")
    artifact.metadata.update(cells=[cell_artifact_name(c) for c in cells], figures=sorted(figures))
    with tempfile.TemporaryDirectory() as tmp:
        for stem, png in sorted(figures.items()):
            path = Path(tmp) / f"{stem}.png"
            path.write_bytes(png)
            artifact.add_file(str(path), name=path.name)
        return run.log_artifact(artifact, aliases=["latest"])  # add_file copied them to staging
