"""The workspace and the report of one sweep, built with `wandb-workspaces` from what the sweep ran.

Sections (the same panels in both): one per knockout type (relative change of p(answer) against
relative depth, one panel per task and window, one line per model: colour = family, dash = size);
patching beside the knockout curves of the same model and task; answer tracking; head-resolved maps
(a custom chart over each per-head table, W&B's heat-map preset). Panels draw the facet keys of
`mmflow.wandb_logger.keys`; the run set is the sweep's cell runs and its sweep run, by id.
The report adds what was run (command, version, commit, models, data, dtype, engine, parity) and
the paper-style figures the sweep run logged (`paper_figure/<stem>`).
"""

from __future__ import annotations

import importlib
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from mmflow.wandb_logger.keys import colours, facet_key, family, heads_key, size, styles

X_TITLE = "relative depth (layer / n_layers)"
HEATMAP = "wandb/confusion_matrix/v1"  # W&B's built-in heat map: two categorical axes, a value each


def import_workspaces() -> tuple[Any, Any, Any]:
    """`(workspaces, reports.v2, expr)` of `wandb-workspaces`; a clear error when it is missing."""
    try:
        ws = importlib.import_module("wandb_workspaces.workspaces")
        wr = importlib.import_module("wandb_workspaces.reports.v2")
        expr = importlib.import_module("wandb_workspaces.expr")
    except ImportError as exc:
        raise RuntimeError(
            "W&B workspaces and reports need the `wandb-workspaces` package: "
            "pip install 'wandb-workspaces>=0.4.13,<0.5'"
        ) from exc
    return ws, wr, expr


@dataclass
class SweepInfo:
    """What the report says about the sweep, and where its runs are."""

    name: str
    sweep_dir: str
    project: str
    entity: str = ""  # "" = the API key's default entity, filled in when publishing
    sweep_run: str | None = None
    command: str = ""
    version: str = ""
    commit: str | None = None
    paper_figures: dict[str, list[str]] = field(default_factory=dict)  # section title -> image keys


def cell_keys(cell: Any) -> list[tuple[str, str, str]]:
    """(facet key, value, legend label) of every curve the cell's run logged."""
    table = cell.analysis.curve_table(cell.results)
    pairs = table[["value", "label"]].drop_duplicates().itertuples(index=False)
    return [(facet_key(cell.config, str(v)), str(v), str(label)) for v, label in pairs]


def _line_plot(wr: Any, title: str, y_title: str, lines: list[tuple[Any, str, str]], cells: list) -> Any:
    """A line plot against relative depth; `lines` = (cell, key, legend); colour by family, dash by size."""
    configs = [c.config for c in cells]
    colour, style = colours(configs), styles(configs)
    series = {f"{cell.cell_id}:{key}": (cell, legend) for cell, key, legend in lines}
    return wr.LinePlot(
        title=title,
        x="rel_depth",
        y=list(dict.fromkeys(key for _, key, _ in lines)),
        title_x=X_TITLE,
        title_y=y_title,
        line_titles={s: legend for s, (_, legend) in series.items()},
        line_colors={s: colour[family(cell.config)] for s, (cell, _) in series.items()},
        line_marks={s: style[size(cell.config)] for s, (cell, _) in series.items()},
    )


def _ordered(cells: list) -> list:
    return sorted(cells, key=lambda c: (c.task, c.kind, c.analysis.labels.order, c.model, c.cell_id))


def sections(cells: Sequence[Any]) -> list[tuple[str, list[Any]]]:
    """(section title, panels) of the done `cells` of one sweep (CellData)."""
    _, wr, _ = import_workspaces()
    cells = _ordered([c for c in cells if len(c.results)])
    out: list[tuple[str, list[Any]]] = []
    compared: dict[str, list] = defaultdict(list)
    for cell in cells:
        if cell.analysis.curve_role == "effect" and cell.analysis.comparison_key() is not None:
            compared[cell.analysis.comparison_key()].append(cell)
    for same in compared.values():
        facets: dict[tuple, list] = defaultdict(list)
        for cell in same:
            facets[(cell.task, cell.window)].append(cell)
        panels = []
        for (task, window), group in facets.items():
            lines = [
                (c, key, c.model_legend) for c in group for key, v, _ in cell_keys(c) if v == "rel_change_pct"
            ]
            title = f"{task}" + (f" — window {window}" if window is not None else "")
            panels.append(_line_plot(wr, title, "relative change of p(answer) (%)", lines, cells))
        out.append((f"Knockout: {same[0].label}", panels))
    out += _patching(wr, cells, compared)
    tracking = [c for c in cells if c.analysis.curve_role == "lens"]
    if tracking:
        panels = [
            _line_plot(
                wr,
                f"{c.model} — {c.task}",
                "p(answer) (%)",
                [(c, k, lab) for k, _, lab in cell_keys(c)],
                cells,
            )
            for c in tracking
        ]
        out.append(("Answer tracking (logit lens)", panels))
    heads = [c for c in cells if "head" in c.results]
    if heads:
        out.append(("Head-resolved knockout maps", [_heads_chart(wr, c) for c in heads]))
    return out


def _patching(wr: Any, cells: list, compared: dict[str, list]) -> list[tuple[str, list[Any]]]:
    """Per model and task: the knockout curves of that model and task, then each patching cell."""
    knockouts = [c for same in compared.values() for c in same]
    by_pair: dict[tuple[str, str], list] = defaultdict(list)
    for cell in (c for c in cells if c.analysis.curve_role == "recovery"):
        by_pair[(cell.model, cell.task)].append(cell)
    panels = []
    for (model, task), patched in by_pair.items():
        ko = [c for c in knockouts if (c.model, c.task) == (model, task)]
        if ko:
            lines = [
                (c, key, f"{c.label} (k={c.window})")
                for c in ko
                for key, v, _ in cell_keys(c)
                if v == "rel_change_pct"
            ]
            panels.append(
                _line_plot(
                    wr, f"{model} — {task}: knockout", "relative change of p(answer) (%)", lines, cells
                )
            )
        for cell in patched:
            lines = [(cell, key, label) for key, _, label in cell_keys(cell)]
            title = f"{model} — {task}: {cell.label}"
            panels.append(_line_plot(wr, title, "recovered fraction of p(answer) (%)", lines, cells))
    return [("Patching beside knockout", panels)] if panels else []


def _heads_chart(wr: Any, cell: Any) -> Any:
    """A heat map of the cell's (layer, head) table: W&B's preset, fields mapped to our columns."""
    return wr.CustomChart(
        query={"summaryTable": {"tableKey": heads_key(cell.config)}},
        chart_name=HEATMAP,
        chart_fields={"Actual": "layer", "Predicted": "head", "nPredictions": "rel_change_pct"},
        chart_strings={"title": f"{cell.model} — {cell.task}: {cell.label}, relative change (%) per head"},
    )


def _laid_out(wr: Any, panels: list[Any], columns: int = 3) -> list[Any]:
    """Panels on a grid (24 units wide), `columns` per row: reports place panels where their layout says."""
    width = 24 // columns
    for i, panel in enumerate(panels):
        panel.layout = wr.Layout(x=(i % columns) * width, y=(i // columns) * 6, w=width, h=6)
    return panels


def run_ids(cells: Sequence[Any], info: SweepInfo) -> list[str]:
    """The runs of the sweep: one per cell (its id) and the sweep run."""
    ids = [c.cell_id for c in cells]
    return ids + ([info.sweep_run] if info.sweep_run else [])


def build_workspace(cells: Sequence[Any], info: SweepInfo) -> Any:
    """The sweep's workspace (`wandb_workspaces.workspaces.Workspace`), runs filtered to the sweep."""
    ws, wr, expr = import_workspaces()
    configs = [c.config for c in cells]
    colour = colours(configs)
    return ws.Workspace(
        entity=info.entity,
        project=info.project,
        name=f"mmflow sweep {info.name}",
        sections=[
            ws.Section(name=title, panels=_laid_out(wr, panels), is_open=True)
            for title, panels in sections(cells)
        ],
        runset_settings=ws.RunsetSettings(
            filters=expr.And(expr.Metric("ID").isin(run_ids(cells, info))),
            run_settings={c.cell_id: ws.RunSettings(color=colour[family(c.config)]) for c in cells},
        ),
    )
