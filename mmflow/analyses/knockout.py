"""The knockout analysis: windows of one block type -> per-layer change of the answer probability.

Config (`mmflow/conf/analysis/knockout.yaml`): `knockout` (name, source, target: a `conf/knockout/` entry)
and `window` (the width k of the window of blocked layers around each centre layer).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import pandas as pd
import torch

from mmflow.analyses.base import Analysis, FigureSpec, Labels, register
from mmflow.analyses.curves import curve_stats
from mmflow.data.sample import Sample
from mmflow.groups import TokenGroups
from mmflow.knockout.reference import CleanPass
from mmflow.knockout.spec import BlockEdges, KnockoutJob, KnockoutSpec, window_layers

RESULT_COLUMNS = [
    "question_id",
    "layer",
    "p_base",
    "p_new",
    "rel_change_pct",
    "logp_change",
    "top1_changed",
    "model",
    "task",
    "knockout",
    "window",
]
# Per-layer means logged next to the curve (result column -> curve-table column).
EXTRAS = {"logp_change": "logp_change", "top1_changed": "top1_changed_frac"}


@register
class KnockoutAnalysis(Analysis):
    """Block `spec` in the window of width `window` around every centre layer 0..L-1."""

    name = "knockout"
    config_keys = ("knockout", "window")
    result_columns = RESULT_COLUMNS
    value_columns = ("rel_change_pct",)
    minimum_of = "rel_change_pct"

    def __init__(self, config) -> None:
        super().__init__(config)
        knockout = self.config["knockout"]
        self.spec = KnockoutSpec(knockout["name"], knockout["source"], knockout["target"])
        self.width = int(self.config["window"])

    # ------------------------------------------------------------ compute side

    def bind(self, loaded) -> KnockoutAnalysis:
        for centre in range(loaded.n_layers):
            window_layers(centre, self.width, loaded.n_layers)  # validates the width early
        return super().bind(loaded)

    @property
    def n_layers(self) -> int:
        return self.loaded.n_layers

    @property
    def row_labels(self) -> dict[str, Any]:
        return {**super().row_labels, "knockout": self.spec.name, "window": self.width}

    def jobs(self, groups: TokenGroups, sample: Sample | None = None) -> list[KnockoutJob]:
        """One job per centre layer; raises `GroupError` if a group is empty."""
        edges = BlockEdges(groups.require(self.spec.source), groups.require(self.spec.target))
        return [KnockoutJob(edges, window_layers(c, self.width, self.n_layers)) for c in range(self.n_layers)]

    def rows(self, sample: Sample, clean: CleanPass, token_id: int, new: torch.Tensor) -> list[dict]:
        """Rows for one sample: clean pass vs knocked-out last-position log-probs `new` [L, V]."""
        logp_base = float(clean.logprobs[token_id])
        p_base = math.exp(logp_base)
        top1 = new.argmax(dim=-1).tolist()
        labels = self.row_labels
        out = []
        for layer in range(self.n_layers):
            logp_new = float(new[layer, token_id])
            p_new = math.exp(logp_new)
            out.append(
                {
                    "question_id": sample.question_id,
                    "layer": layer,
                    "p_base": p_base,
                    "p_new": p_new,
                    "rel_change_pct": (p_new - p_base) / p_base * 100.0,
                    "logp_change": logp_new - logp_base,
                    "top1_changed": top1[layer] != token_id,
                    **labels,
                }
            )
        return out

    # ------------------------------------------------------------ output side

    def curve_table(self, results: pd.DataFrame) -> pd.DataFrame:
        """The relative-change curve (%) per centre layer, with the mean logp change and flip rate."""
        if not len(results):
            return pd.DataFrame(columns=["value", "label", "layer", "n", "mean", "sem", "ci_low", "ci_high"])
        table = curve_stats(results, "rel_change_pct")
        for column, name in EXTRAS.items():
            if column in results:
                means = results.groupby("layer")[column].mean().astype(float)
                table = table.join(means.rename(name), on="layer")
        table.insert(0, "label", self.spec.label)
        table.insert(0, "value", "rel_change_pct")
        return table

    @property
    def labels(self) -> Labels:
        from mmflow.analyses.knockout_figures import knockout_order

        return Labels(
            variant=self.spec.name,
            legend=self.spec.label,
            tags=(str(self.config["model"]["name"]), str(self.config["task"]), f"window={self.width}"),
            order=(knockout_order(self.spec.name), self.width),
            window=self.width,
        )

    def figure(self, cell: Any):
        from mmflow.analyses.knockout_figures import plot_model_task

        return plot_model_task([cell]) if len(cell.results) else None

    def comparison_key(self) -> str | None:
        return self.spec.name

    @classmethod
    def plot_comparison(cls, cells: Sequence[Any]):
        from mmflow.analyses.knockout_figures import plot_cross_model

        return plot_cross_model(cells)

    @classmethod
    def report_sections(cls, cells: Sequence[Any]) -> list[tuple[str, list[FigureSpec]]]:
        """Per model and task (one line per knockout), across models, and a per-model overview."""
        from mmflow.analyses.knockout_figures import plot_model_overview, plot_model_task

        cells = [c for c in cells if len(c.results)]
        per_model = [
            FigureSpec(f"{model}__{task}__k{k}", f"{model} — {task} (k = {k})", plot_model_task(group))
            for (model, task, k), group in _by(cells, "model", "task", "window").items()
        ]
        cross = [
            FigureSpec(
                f"cross__{task}__{knockout}",
                f"{group[0].label} — {task} (relative depth)",
                cls.plot_comparison(group),
            )
            for (task, knockout), group in _by(cells, "task", "variant").items()
        ]
        overview = [
            FigureSpec(
                f"{model}__overview__k{k}", f"{model} — every task (k = {k})", plot_model_overview(group)
            )
            for (model, k), group in _by(cells, "model", "window").items()
            if len({c.task for c in group}) > 1
        ]
        sections = [("Per model and task", per_model), ("Across models (relative depth)", cross)]
        return ([("Per model: every task", overview)] if overview else []) + sections


def _by(cells: Sequence[Any], *keys: str) -> dict[tuple, list]:
    groups: dict[tuple, list] = defaultdict(list)
    for cell in cells:
        groups[tuple(getattr(cell, k) for k in keys)].append(cell)
    return groups
