"""Lineage of runs written offline, declared after `wandb sync` (W&B has no `use_artifact` offline).

The sweep's spec file keeps what each cell was computed from (`mmflow.wandb_logger.artifacts.inputs`)
and which cells the sweep run's figures come from. `link_inputs` then, through the W&B API: creates
the input artifacts that do not exist yet (one `mmflow-inputs` run logs them), declares them inputs
of each cell's run, and the cells' artifacts inputs of the sweep run. What is already declared (an
online run did it) is left alone, so linking twice adds nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mmflow.wandb_logger.artifacts import cell_artifact_name, input_artifact, inputs


def lineage_record(cells: list[Any], sweep_run: str | None) -> dict[str, Any]:
    """What the spec file keeps for `link_inputs`: each cell's inputs and the sweep run."""
    return {"cells": {c.cell_id: inputs(c.config) for c in cells}, "sweep_run": sweep_run}


def _exists(api: Any, path: str) -> bool:
    from wandb.errors import CommError

    try:
        api.artifact(path)
    except CommError:
        return False
    return True


def create_inputs(entity: str, project: str, described: list[tuple[str, Mapping[str, Any]]]) -> None:
    """Log the input artifacts in one online run (job type `mmflow-inputs`) and wait for them."""
    from mmflow.wandb_logger.settings import _settings, import_wandb

    wandb = import_wandb()
    run = wandb.init(
        mode="online",  # only ever after `wandb sync`: the server must have them
        entity=entity,
        project=project,
        job_type="mmflow-inputs",
        name="mmflow inputs",
        settings=_settings(wandb),
        reinit="create_new",
    )
    try:
        for kind, item in described:
            run.log_artifact(input_artifact(wandb, kind, item)).wait()
    finally:
        run.finish()


def _use(api: Any, run: Any, prefix: str, names: list[str]) -> list[str]:
    used = {a.name.split(":")[0] for a in run.used_artifacts()}
    added = []
    for name in names:
        if name not in used:
            run.use_artifact(api.artifact(f"{prefix}/{name}:latest"))
            added.append(name)
    return added


def link_inputs(api: Any, entity: str, project: str, lineage: Mapping[str, Any]) -> dict[str, list[str]]:
    """Declare the inputs of the sweep's runs (see the module docstring); returns what was added per run."""
    prefix = f"{entity}/{project}"
    wanted: dict[str, tuple[str, Mapping[str, Any]]] = {}
    for described in lineage["cells"].values():
        for kind, item in described.items():
            wanted[item["artifact"]] = (kind, item)
    missing = [wanted[name] for name in sorted(wanted) if not _exists(api, f"{prefix}/{name}:latest")]
    if missing:
        create_inputs(entity, project, missing)
    added = {}
    for cell, described in lineage["cells"].items():
        names = [item["artifact"] for item in described.values()]
        added[cell] = _use(api, api.run(f"{prefix}/{cell}"), prefix, names)
    if lineage.get("sweep_run"):
        cells = [cell_artifact_name(c) for c in lineage["cells"]]
        added[lineage["sweep_run"]] = _use(api, api.run(f"{prefix}/{lineage['sweep_run']}"), prefix, cells)
    return added
