"""The knockout analysis: windows of one block type -> per-layer change of the answer probability.

Config (`conf/analysis/knockout.yaml`): `knockout` (name, source, target: a `conf/knockout/` entry)
and `window` (the width k of the window of blocked layers around each centre layer).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch

from mmflow.analyses.base import Analysis, FigureSpec, Labels, SamplePlan, register
from mmflow.analyses.curves import curve_stats
from mmflow.config.checks import check_choice, check_window, window_for_depth
from mmflow.data.sample import Sample
from mmflow.errors import CellConfigError
from mmflow.inputs.groups import TokenGroups
from mmflow.knockout.spec import BlockEdges, KnockoutJob, KnockoutSpec, window_layers

if TYPE_CHECKING:
    from mmflow.execution.engines import Engines
    from mmflow.knockout.clean_pass import CleanPass

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
RESULT_TYPES = {
    "question_id": "string",
    "layer": "int64",
    "head": "int64",  # knockout.heads: each
    "heads": "string",  # knockout.heads: a list, e.g. "0,2"
    "p_base": "float64",
    "p_new": "float64",
    "rel_change_pct": "float64",
    "logp_change": "float64",
    "top1_changed": "bool",
    "model": "string",
    "task": "string",
    "knockout": "string",
    "window": "int64",
}


def head_sets(heads: str | int | Sequence[int] | None, n_heads: int) -> list[tuple[int, ...] | None]:
    """`knockout.heads` -> the head set of each job per centre layer: None (every head, one job),
    `each` (one job per head), or a list of heads blocked together (one job). ValueError if out of range."""
    if heads is None:
        return [None]
    if heads == "each":
        return [(h,) for h in range(n_heads)]
    if not heads_form_ok(heads):
        raise ValueError(f"knockout.heads must be null, 'each' or heads in 0..{n_heads - 1}, got {heads!r}")
    chosen = (heads,) if isinstance(heads, int) else tuple(sorted(set(heads)))
    if not all(0 <= h < n_heads for h in chosen):
        raise ValueError(f"knockout.heads must be null, 'each' or heads in 0..{n_heads - 1}, got {heads!r}")
    return [chosen]


def heads_form_ok(heads: Any) -> bool:
    """`knockout.heads` is null, `each`, a head index >= 0 or a non-empty list of them (the range
    is checked against the loaded model, `head_sets`)."""
    if heads is None or heads == "each":
        return True
    if isinstance(heads, int) and not isinstance(heads, bool):
        return heads >= 0
    if isinstance(heads, Sequence) and not isinstance(heads, str) and heads:
        return all(isinstance(h, int) and not isinstance(h, bool) and h >= 0 for h in heads)
    return False


def canonical_knockout(config: dict[str, Any]) -> dict[str, Any]:
    """The cell config as its id sees it: `knockout.heads: null` (every head) is the knockout as it was
    before heads existed, so it is left out and keeps the cell ids computed then."""
    knockout = config.get("knockout")
    if isinstance(knockout, dict) and "heads" in knockout and knockout["heads"] is None:
        return {**config, "knockout": {k: v for k, v in knockout.items() if k != "heads"}}
    return config


# Token groups in prompt order (docs/method.md, "Token groups"): the image comes first, then the question,
# then the last position; object/nonobject lie inside the image, the options inside the question.
GROUP_RANK = {
    "image": 0,
    "object": 0,
    "nonobject": 0,
    "question": 1,
    "true_option": 1,
    "false_option": 1,
    "last": 2,
}


# Per-layer means logged next to the curve (result column -> curve-table column).
EXTRAS = {"logp_change": "logp_change", "top1_changed": "top1_changed_frac"}


@register
class KnockoutAnalysis(Analysis):
    """Block `spec` in the window of width `window` around every centre layer 0..L-1.

    With `knockout.heads` (see `head_sets`) the edges are blocked in those attention heads only; rows
    then record the head (`each`: column `head`, the head index) or the head set (a list: column
    `heads`, e.g. "0,2").
    """

    name = "knockout"
    uses = frozenset({"knockouts"})
    config_keys = ("knockout", "window")
    result_columns = RESULT_COLUMNS
    result_types = RESULT_TYPES
    value_columns = ("rel_change_pct",)
    minimum_of = "rel_change_pct"

    @classmethod
    def validate(cls, config) -> None:
        """Source and target are token groups, the source not after the target in the prompt (else
        causal attention leaves nothing to block); window in 1..n_layers."""
        knockout = config.get("knockout") or {}
        source, target = knockout.get("source"), knockout.get("target")
        groups = tuple(GROUP_RANK)
        check_choice("knockout.source", source, groups)
        check_choice("knockout.target", target, groups)
        if GROUP_RANK[source] > GROUP_RANK[target]:
            later = [g for g, r in GROUP_RANK.items() if r <= GROUP_RANK[target]]
            raise CellConfigError(
                "knockout.source",
                source,
                f"comes after target {target!r} in the prompt, so causal attention never lets {target} "
                f"attend to it and the knockout blocks nothing; for target {target!r} use a source in "
                f"{', '.join(later)}",
            )
        if not heads_form_ok(knockout.get("heads")):
            raise CellConfigError(
                "knockout.heads",
                knockout.get("heads"),
                "must be null, 'each', a head index or a list of them",
            )
        check_window(config)

    def __init__(self, config) -> None:
        super().__init__(config)
        knockout = self.config["knockout"]
        self.spec = KnockoutSpec(knockout["name"], knockout["source"], knockout["target"])
        self.width = int(self.config["window"])
        self.heads = knockout.get("heads")
        self.head_column = None if self.heads is None else "head" if self.heads == "each" else "heads"
        self.head_sets: list[tuple[int, ...] | None] = [None]
        if self.head_column is not None:
            self.result_columns = RESULT_COLUMNS[:2] + [self.head_column] + RESULT_COLUMNS[2:]
            self.sort_by = ["question_id", "layer", self.head_column]

    @classmethod
    def canonical(cls, config: dict[str, Any]) -> dict[str, Any]:
        return canonical_knockout(config)

    # ------------------------------------------------------------ compute side

    def bind(self, loaded) -> KnockoutAnalysis:
        """Check the window against the loaded depth (`window_for_depth`: a shrunk replica's own)."""
        self.width = window_for_depth(self.config, loaded.n_layers, loaded.weights)
        self.head_sets = head_sets(self.heads, int(loaded.model.config.get_text_config().num_attention_heads))
        return super().bind(loaded)

    @property
    def n_layers(self) -> int:
        return self.loaded.n_layers

    @property
    def row_labels(self) -> dict[str, Any]:
        return {**super().row_labels, "knockout": self.spec.name, "window": self.width}

    def jobs(self, groups: TokenGroups) -> list[KnockoutJob]:
        """One job per centre layer and head set (centre-major); raises `GroupError` if a group is empty."""
        edges = BlockEdges(groups.require(self.spec.source), groups.require(self.spec.target))
        return [
            KnockoutJob(edges, window_layers(c, self.width, self.n_layers), heads)
            for c in range(self.n_layers)
            for heads in self.head_sets
        ]

    def plan(self, groups: TokenGroups, sample: Sample) -> SamplePlan:
        """The knockout jobs (`jobs`), batched by the runtime with the other cells' of the sample."""
        return SamplePlan(knockouts=self.jobs(groups))

    def _head_value(self, heads: tuple[int, ...]) -> int | str:
        return heads[0] if self.head_column == "head" else ",".join(map(str, heads))

    def rows(
        self,
        sample: Sample,
        clean: CleanPass,
        token_id: int,
        plan: SamplePlan,
        outputs: torch.Tensor,
        engines: Engines,
    ) -> list[dict]:
        """Rows for one sample: clean pass vs knocked-out last-position log-probs `outputs` [J, V]
        (J = centre layers x head sets, in `jobs` order)."""
        new = outputs
        logp_base = float(clean.logprobs[token_id])
        p_base = math.exp(logp_base)
        top1 = new.argmax(dim=-1).tolist()
        labels = self.row_labels
        out = []
        for index, (layer, heads) in enumerate((c, h) for c in range(self.n_layers) for h in self.head_sets):
            logp_new = float(new[index, token_id])
            p_new = math.exp(logp_new)
            row = {"question_id": sample.question_id, "layer": layer}
            if heads is not None:
                row[self.head_column] = self._head_value(heads)
            row.update(
                {
                    "p_base": p_base,
                    "p_new": p_new,
                    "rel_change_pct": (p_new - p_base) / p_base * 100.0,
                    "logp_change": logp_new - logp_base,
                    "top1_changed": top1[index] != token_id,
                    **labels,
                }
            )
            out.append(row)
        return out

    def headline(self, results: pd.DataFrame) -> dict[str, Any]:
        """The curve's minimum and its layer; per head (`heads: each`) the (layer, head) minimum."""
        if self.head_column != "head" or not len(results):
            return super().headline(results)
        curve = results.groupby(["layer", "head"])["rel_change_pct"].mean()
        layer, head = curve.idxmin()
        return {"min_rel_change_pct": float(curve.min()), "min_layer": int(layer), "min_head": int(head)}

    # ------------------------------------------------------------ output side

    def curve_table(self, results: pd.DataFrame) -> pd.DataFrame:
        """The relative-change curve (%) per centre layer, with the mean logp change and flip rate.

        Per-head cells: each sample's mean over its head sets first, so n counts samples."""
        if not len(results):
            return pd.DataFrame(columns=["value", "label", "layer", "n", "mean", "sem", "ci_low", "ci_high"])
        if self.head_column is not None and self.head_column in results:
            # per-head rows: one number per sample and layer (the mean over the head sets), so the
            # band's n counts samples, not head sets x samples
            columns = ["rel_change_pct", *(c for c in EXTRAS if c in results)]
            results = (
                results.assign(**{c: results[c].astype(float) for c in columns})
                .groupby(["question_id", "layer"], as_index=False)[columns]
                .mean()
            )
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

        legend = self.spec.label
        if self.heads is not None:
            legend += f" ({'per head' if self.heads == 'each' else f'heads {self.heads}'})"
        return Labels(
            variant=self.spec.name,
            legend=legend,
            tags=(str(self.config["model"]["name"]), str(self.config["task"]), f"window={self.width}"),
            order=(knockout_order(self.spec.name), self.width),
            window=self.width,
            heads=None if self.heads is None else _heads_label(self.heads),
        )

    def figure(self, cell: Any):
        from mmflow.analyses.knockout_figures import plot_model_task
        from mmflow.analyses.patching_figures import plot_head_heatmap

        if not len(cell.results):
            return None
        return plot_head_heatmap(cell) if self.heads == "each" else plot_model_task([cell])

    def comparison_key(self) -> str | None:
        return self.spec.name if self.heads is None else None

    @classmethod
    def plot_comparison(cls, cells: Sequence[Any]):
        from mmflow.analyses.knockout_figures import plot_cross_model

        return plot_cross_model(cells)

    @classmethod
    def report_sections(cls, cells: Sequence[Any]) -> list[tuple[str, list[FigureSpec]]]:
        """Per model and task (one line per knockout), across models, and a per-model overview."""
        from mmflow.analyses.knockout_figures import plot_model_overview, plot_model_task
        from mmflow.analyses.patching_figures import head_sections

        mine = [c for c in cells if c.kind == cls.name and len(c.results)]
        per_head = head_sections([c for c in mine if c.analysis.heads == "each"])
        cells = [c for c in mine if c.analysis.heads is None]
        per_model = [
            FigureSpec(
                f"{model}__{task}__k{k}",
                f"{model} — {task} (k = {k})",
                lambda subset=subset: plot_model_task(subset),
                subset,
            )
            for (model, task, k), subset in _by(cells, "model", "task", "window").items()
        ]
        cross = [
            FigureSpec(
                f"cross__{task}__{knockout}",
                f"{subset[0].label} — {task} (relative depth)",
                lambda subset=subset: cls.plot_comparison(subset),
                subset,
            )
            for (task, knockout), subset in _by(cells, "task", "variant").items()
        ]
        overview = [
            FigureSpec(
                f"{model}__overview__k{k}",
                f"{model} — every task (k = {k})",
                lambda subset=subset: plot_model_overview(subset),
                subset,
            )
            for (model, k), subset in _by(cells, "model", "window").items()
            if len({c.task for c in subset}) > 1
        ]
        sections = [("Per model and task", per_model), ("Across models (relative depth)", cross)]
        sections = ([("Per model: every task", overview)] if overview else []) + sections
        return (sections if cells else []) + per_head


def _by(cells: Sequence[Any], *keys: str) -> dict[tuple, list]:
    groups: dict[tuple, list] = defaultdict(list)
    for cell in cells:
        groups[tuple(getattr(cell, k) for k in keys)].append(cell)
    return groups


def _heads_label(heads: Any) -> str:
    """ "each", or the chosen heads joined by "_" (a key-safe name of a head selection)."""
    return "_".join(map(str, heads)) if isinstance(heads, (list, tuple)) else str(heads)
