"""The report of one sweep: what was run, then the workspace's sections and the paper-style figures."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mmflow.storage.secrets import redact
from mmflow.wandb_logger.keys import data_input, model_input
from mmflow.wandb_logger.specs import SweepInfo, _laid_out, import_workspaces, run_ids, sections


def mmflow_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mmflow")
    except PackageNotFoundError:
        return "unknown (not installed)"


def mmflow_commit() -> str | None:
    """The git commit of the mmflow checkout this runs from (None outside a checkout), `+dirty` if edited."""
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    try:
        git = ["git", "-C", str(root)]
        head = subprocess.run(
            [*git, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        )
        dirty = subprocess.run(
            [*git, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def this_command() -> str:
    """The command line of this process, secrets redacted."""
    return " ".join(str(a) for a in redact(list(sys.argv)))


def what_was_run(cells: Sequence[Any], info: SweepInfo) -> str:
    """Markdown: command, version, commit, models and checkpoints, data and digest, dtype, engine, parity."""
    lines = [
        f"**Command:** `{info.command or '?'}`",
        f"**mmflow:** {info.version or '?'}, commit `{info.commit or 'unknown'}`",
        f"**Sweep folder:** `{info.sweep_dir}` ({len(cells)} done cells)",
        "",
        "| model | checkpoint | revision | dtype | task | analysis | data | data digest | engine | parity |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows = set()
    for cell in cells:
        model, data = model_input(cell.config), data_input(cell.config)
        of = "sha256 of the file" if data["digest_of"] == "file" else "sha256 of its config"
        digest = f"{data['digest'][:16]} ({of})"
        rows.add(
            (
                cell.model,
                model["checkpoint"],
                str(model["revision"] or "-"),
                str(model["dtype"] or "-"),
                cell.task,
                cell.label,
                str(data["data"].get("name", "?")),
                digest,
                str(cell.meta.get("engine") or "-"),
                str(cell.meta.get("parity") or "none (no paper-code differences)"),
            )
        )
    lines += ["| " + " | ".join(row) + " |" for row in sorted(rows)]
    return "\n".join(lines)


def build_report(cells: Sequence[Any], info: SweepInfo) -> Any:
    """The sweep's report (`wandb_workspaces.reports.v2.Report`)."""
    _, wr, expr = import_workspaces()

    def runset(ids: list[str]) -> Any:
        return wr.Runset(
            entity=info.entity,
            project=info.project,
            name=f"sweep {info.name}",
            filters=expr.And(expr.Metric("ID").isin(ids)),
        )

    cells_runset = runset(run_ids(cells, info))
    blocks: list[Any] = [
        wr.P(
            f"The attention-knockout analysis of Zhang et al. (CVPR 2025) run by mmflow: sweep '{info.name}'."
        ),
        wr.H2("What was run"),
        wr.MarkdownBlock(what_was_run(cells, info)),
    ]
    for title, panels in sections(cells):
        blocks += [wr.H2(title), wr.PanelGrid(runsets=[cells_runset], panels=_laid_out(wr, panels))]
    if info.sweep_run and info.paper_figures:
        blocks.append(wr.H2("Figures as in the paper"))
        for title, keys in info.paper_figures.items():
            browser = wr.MediaBrowser(title=title, media_keys=keys, num_columns=2)
            blocks += [
                wr.H3(title),
                wr.PanelGrid(runsets=[runset([info.sweep_run])], panels=_laid_out(wr, [browser], 1)),
            ]
    return wr.Report(
        entity=info.entity,
        project=info.project,
        title=f"mmflow sweep {info.name}"[:128],
        description=f"{len(cells)} cells; built by mmflow {info.version}",
        blocks=blocks,
        width="fluid",
    )
