"""Spec files in the sweep folder, and publishing them: `mmflow wandb publish SWEEP_DIR`.

At the end of a sweep the workspace and the report are written as `wandb-workspace.json` and
`wandb-report.json` (the specs `wandb-workspaces` sends to the server, with the sweep's details).
Online the sweep publishes them itself; offline, run `wandb sync` and then `mmflow wandb publish`.
Publishing records the workspace's and the report's ids and urls in `wandb-published.json`, and a
second publish updates the same workspace and report.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mmflow.storage.store import atomic_write_json
from mmflow.wandb_logger.lineage import lineage_record, link_inputs
from mmflow.wandb_logger.report_spec import build_report
from mmflow.wandb_logger.specs import SweepInfo, build_workspace, import_workspaces

WORKSPACE_FILE, REPORT_FILE, PUBLISHED_FILE = (
    "wandb-workspace.json",
    "wandb-report.json",
    "wandb-published.json",
)
FORMAT = "mmflow-wandb-spec/1"


def write_specs(sweep_dir: str | Path, cells: Sequence[Any], info: SweepInfo) -> tuple[Path, Path]:
    """Build the workspace and the report of the sweep's done `cells` and write both spec files."""
    sweep_dir = Path(sweep_dir)
    info_dict = dataclasses.asdict(info)
    paths = (sweep_dir / WORKSPACE_FILE, sweep_dir / REPORT_FILE)
    # No entity in the specs: a report's run set with one asks the server for the project's id.
    unplaced = dataclasses.replace(info, entity="")
    specs = (build_workspace(cells, unplaced), build_report(cells, unplaced))
    lineage = lineage_record(list(cells), info.sweep_run)
    for path, built in zip(paths, specs, strict=True):
        model = built._to_model()
        spec = model.model_dump(mode="json", by_alias=True, exclude_none=True)
        atomic_write_json(path, {"format": FORMAT, "info": info_dict, "lineage": lineage, "spec": spec})
    return paths


def _read(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: the sweep writes it at its end (W&B logging on)")
    data = json.loads(path.read_text())
    if data.get("format") != FORMAT:
        raise ValueError(f"{path}: not an mmflow W&B spec (format {data.get('format')!r}, expected {FORMAT})")
    return data


def load_workspace(path: str | Path) -> Any:
    """The `Workspace` of a spec file, validated by `wandb-workspaces`' own models."""
    ws, _, _ = import_workspaces()
    from wandb_workspaces.workspaces import internal

    return ws.Workspace._from_model(internal.View.model_validate(_read(Path(path))["spec"]))


def load_report(path: str | Path) -> Any:
    """The `Report` of a spec file, validated by `wandb-workspaces`' own models."""
    _, wr, _ = import_workspaces()
    from wandb_workspaces.reports.v2 import internal

    return wr.Report._from_model(internal.ReportViewspec.model_validate(_read(Path(path))["spec"]))


def _place(report: Any, entity: str, project: str) -> None:
    """Put the report and its run sets in `entity/project` (the specs hold no entity)."""
    report.entity, report.project = entity, project
    for block in report.blocks:
        for runset in getattr(block, "runsets", None) or []:
            runset.entity, runset.project = entity, project


def publish(sweep_dir: str | Path, entity: str | None = None, project: str | None = None) -> dict[str, Any]:
    """Create (or update) the sweep's workspace and report on W&B; returns what `wandb-published.json` holds.

    Needs a W&B server and the API key in the environment. The entity is `entity`, else the one in
    the specs, else the API key's default entity.
    """
    import wandb

    sweep_dir = Path(sweep_dir)
    workspace, report = load_workspace(sweep_dir / WORKSPACE_FILE), load_report(sweep_dir / REPORT_FILE)
    info = _read(sweep_dir / WORKSPACE_FILE)["info"]
    entity = entity or info.get("entity") or wandb.Api().default_entity
    if not entity:
        raise RuntimeError("no W&B entity: pass --entity or set logger.entity")
    project = project or info["project"]
    path = sweep_dir / PUBLISHED_FILE
    published = json.loads(path.read_text()) if path.exists() else {}
    same_place = published.get("entity") == entity and published.get("project") == project
    workspace.entity, workspace.project = entity, project
    _place(report, entity, project)
    if same_place and published.get("workspace"):  # update the same view, not a new copy
        workspace._internal_name = published["workspace"]["name"]
        workspace._internal_id = published["workspace"]["id"]
    if same_place and published.get("report"):
        report.id = published["report"]["id"]
    workspace.save()
    report.save()
    record = {
        "entity": entity,
        "project": project,
        "workspace": {"id": workspace._internal_id, "name": workspace._internal_name, "url": workspace.url},
        "report": {"id": report.id, "url": report.url},
    }
    atomic_write_json(path, record)  # the views exist: a lineage failure must not lose their ids
    try:
        record["lineage"] = {"added": link_inputs(wandb.Api(), entity, project, info_lineage(sweep_dir))}
    except Exception as exc:  # noqa: BLE001 - the views are saved; say what is missing
        record["lineage"] = {"error": f"{type(exc).__name__}: {exc}"}
        print(f"[mmflow] W&B lineage not declared ({record['lineage']['error']}); publish again to retry")
    atomic_write_json(path, record)
    return record


def info_lineage(sweep_dir: Path) -> dict[str, Any]:
    return _read(sweep_dir / WORKSPACE_FILE)["lineage"]


def main(argv: Sequence[str] | None = None) -> int:
    """`mmflow wandb publish SWEEP_DIR [--entity E] [--project P]`."""
    parser = argparse.ArgumentParser(prog="mmflow wandb", description="W&B workspace and report of a sweep")
    commands = parser.add_subparsers(dest="command", required=True)
    pub = commands.add_parser(
        "publish", help="create or update the sweep's workspace and report (after `wandb sync`)"
    )
    pub.add_argument("sweep_dir", type=Path)
    pub.add_argument("--entity", default=None)
    pub.add_argument("--project", default=None)
    args = parser.parse_args(argv)
    try:
        record = publish(args.sweep_dir, args.entity, args.project)
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        print(f"[mmflow] error: {exc}")
        return 2
    print(f"[mmflow] W&B workspace: {record['workspace']['url']}")
    print(f"[mmflow] W&B report: {record['report']['url']}")
    return 0
