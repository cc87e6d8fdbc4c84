"""The attribution screen: per-head (and per-source-token) knockout estimates, verified by exact knockouts.

For one knockout type (`knockout`: source -> target), every centre layer's window (`window`, default 1)
and every attention head (with `attribution.sources: patches` also every single source token), the
change of log p(answer) when that edge set is blocked is estimated from one forward and one backward
per sample (`mmflow.knockout.attribution`, AtP* with the QK correction). In the same cell, each sample's
`attribution.top_k` largest |estimates| plus `attribution.controls` random others are recomputed exactly
by the cell's engine (head-resolved knockouts): rows carry `estimate`, `exact` (NaN where not verified)
and `verified`; the headline gives the agreement (`mmflow.analyses.attribution_agreement`).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from mmflow.analyses.attribution_agreement import agreement
from mmflow.analyses.base import Analysis, Labels, register
from mmflow.analyses.curves import curve_stats
from mmflow.analyses.knockout import KnockoutAnalysis
from mmflow.config.checks import check_choice, check_int
from mmflow.data.sample import Sample
from mmflow.errors import CellConfigError
from mmflow.inputs.groups import TokenGroups
from mmflow.knockout.spec import BlockEdges, KnockoutJob, KnockoutSpec, window_layers

if TYPE_CHECKING:
    from mmflow.knockout.reference import CleanPass
    from mmflow.models.registry import LoadedModel

RESULT_COLUMNS = [
    "question_id",
    "layer",
    "head",
    "estimate",
    "exact",
    "verified",
    "top_k",
    "control",
    "p_base",
    "model",
    "task",
    "knockout",
    "window",
    "sources",
]
RESULT_TYPES = {
    "question_id": "string",
    "layer": "int64",  # centre layer of the window
    "head": "int64",
    "source": "int64",  # attribution.sources: patches: the source token's position
    "estimate": "float64",  # estimated change of log p(answer)
    "exact": "float64",  # the exact change where verified, else NaN
    "verified": "bool",
    "top_k": "bool",
    "control": "bool",
    "p_base": "float64",
    "model": "string",
    "task": "string",
    "knockout": "string",
    "window": "int64",
    "sources": "string",
}
SOURCES = ("group", "patches")
IMAGE_GROUPS = ("image", "object", "nonobject")
DEFAULTS = {"sources": "group", "top_k": 5, "controls": 5, "seed": 0}


def settings(config) -> dict[str, Any]:
    """`attribution` with its defaults filled in."""
    return {**DEFAULTS, **(config.get("attribution") or {})}


@register
class AttributionAnalysis(Analysis):
    """Estimates for every (centre layer, head[, source token]) of one knockout type, partly verified."""

    name = "attribution"
    curve_role = "screen"  # estimates per layer x head: its own map in the report, no dashboard curve
    config_keys = ("knockout", "window")
    result_columns = RESULT_COLUMNS
    result_types = RESULT_TYPES
    sort_by = ["question_id", "layer", "head"]

    @classmethod
    def validate(cls, config) -> None:
        """The knockout's own checks, plus known `attribution.sources`, top_k >= 1, controls >= 0; per
        source token the source must be an image group."""
        KnockoutAnalysis.validate(config)
        values = settings(config)
        check_choice("attribution.sources", values["sources"], SOURCES)
        check_int({"attribution.top_k": values["top_k"]}, "attribution.top_k", 1)
        check_int({"attribution.controls": values["controls"]}, "attribution.controls", 0)
        check_int({"attribution.seed": values["seed"]}, "attribution.seed", 0)
        source = (config.get("knockout") or {}).get("source")
        if values["sources"] == "patches" and source not in IMAGE_GROUPS:
            raise CellConfigError(
                "attribution.sources",
                "patches",
                f"needs an image source ({', '.join(IMAGE_GROUPS)}), not {source!r}",
            )

    def __init__(self, config) -> None:
        super().__init__(config)
        knockout = self.config["knockout"]
        self.spec = KnockoutSpec(knockout["name"], knockout["source"], knockout["target"])
        self.width = int(self.config["window"])
        values = settings(self.config)
        self.patches = values["sources"] == "patches"
        self.top_k, self.controls = int(values["top_k"]), int(values["controls"])
        self.seed = int(values["seed"])
        if self.patches:
            self.result_columns = RESULT_COLUMNS[:3] + ["source"] + RESULT_COLUMNS[3:]
            self.sort_by = ["question_id", "layer", "head", "source"]
        self._edges: dict[str, BlockEdges] = {}

    # ------------------------------------------------------------ compute side

    def bind(self, loaded: LoadedModel) -> AttributionAnalysis:
        from mmflow.knockout import make_engine  # transformers: only where a model runs

        engine = self.config["engine"]
        self.engine = make_engine(engine["name"], loaded, engine["attention"])
        self.windows = [window_layers(c, self.width, loaded.n_layers) for c in range(loaded.n_layers)]
        return super().bind(loaded)

    @property
    def row_labels(self) -> dict[str, Any]:
        sources = "patches" if self.patches else "group"
        return {**super().row_labels, "knockout": self.spec.name, "window": self.width, "sources": sources}

    def jobs(self, groups: TokenGroups, sample: Sample | None = None) -> list[KnockoutJob]:
        """No engine jobs from the clean pass; resolves the edges (`GroupError` skips the sample)."""
        if sample is None:
            raise TypeError("attribution needs the sample in jobs(groups, sample)")
        self._edges[sample.question_id] = BlockEdges(
            groups.require(self.spec.source), groups.require(self.spec.target)
        )
        return []

    def first_target(self, groups: TokenGroups) -> int:
        """The first target: the fast engine's clean pass caches from there for the verification."""
        return int(groups.require(self.spec.target).min())

    def rows(self, sample: Sample, clean: CleanPass, token_id: int, new: torch.Tensor) -> list[dict]:
        """Estimates of every (centre, head[, source]) of one sample; the chosen ones recomputed exactly."""
        from mmflow.knockout.attribution import answer_gradients, layer_head_estimates, window_sum

        edges = self._edges.pop(sample.question_id)
        gradients = answer_gradients(self.loaded, clean.inputs, token_id, clean)
        per_layer = layer_head_estimates(gradients, edges.sources, edges.targets, self.patches)
        estimates = window_sum(per_layer, self.windows).cpu()  # [C, H] or [C, H, S]
        shape, flat = tuple(estimates.shape), estimates.flatten().numpy()
        chosen, top, control = self.choose(flat, sample.question_id)
        jobs = [self._job(edges, np.unravel_index(i, shape)) for i in chosen]
        logp_base = float(clean.logprobs[token_id])
        exact = np.full(flat.shape, np.nan)
        if jobs:
            exact[chosen] = (self.engine.run(clean, jobs)[:, token_id] - logp_base).cpu().numpy()
        constant = {"question_id": sample.question_id, "p_base": math.exp(logp_base), **self.row_labels}
        out = []
        for index, where in enumerate(np.ndindex(*shape)):
            row = {**constant, "layer": where[0], "head": where[1]}
            if self.patches:
                row["source"] = where[2]
            verified = not math.isnan(exact[index])
            row.update(
                estimate=float(flat[index]),
                exact=float(exact[index]),
                verified=verified,
                top_k=bool(top[index]),
                control=bool(control[index]),
            )
            out.append(row)
        return out

    def choose(self, flat: np.ndarray, question_id: str) -> tuple[list[int], np.ndarray, np.ndarray]:
        """Indices to verify (top-k |estimate| first, then the random controls) and the two masks."""
        order = np.argsort(-np.abs(flat), kind="stable")
        top_indices = order[: self.top_k]
        rest = order[self.top_k :]
        rng = np.random.default_rng([self.seed, zlib.crc32(question_id.encode())])
        control_indices = rng.choice(rest, size=min(self.controls, len(rest)), replace=False)
        top, control = np.zeros(flat.shape, bool), np.zeros(flat.shape, bool)
        top[top_indices], control[control_indices] = True, True
        return [int(i) for i in (*top_indices, *control_indices)], top, control

    def _job(self, edges: BlockEdges, where: tuple) -> KnockoutJob:
        sources = edges.sources[int(where[2]) : int(where[2]) + 1] if self.patches else edges.sources
        return KnockoutJob(BlockEdges(sources, edges.targets), self.windows[int(where[0])], (int(where[1]),))

    # ------------------------------------------------------------ output side

    def headline(self, results: pd.DataFrame) -> dict[str, Any]:
        """Agreement with the exact knockouts, and the (layer, head) with the most negative mean estimate."""
        if not len(results):
            return {}
        means = results.groupby(["layer", "head"])["estimate"].mean()
        layer, head = means.idxmin()
        out = agreement(results, self.top_k)
        out.update(min_estimate=float(means.min()), min_layer=int(layer), min_head=int(head))
        return out

    def curve_table(self, results: pd.DataFrame) -> pd.DataFrame:
        """Per centre layer: the estimate (Δ log p) summed over heads (and sources), over samples."""
        columns = ["value", "label", "layer", "n", "mean", "sem", "ci_low", "ci_high"]
        if not len(results):
            return pd.DataFrame(columns=columns)
        summed = results.groupby(["question_id", "layer"], as_index=False)["estimate"].sum()
        table = curve_stats(summed, "estimate")
        table.insert(0, "label", f"{self.spec.label} (attribution)")
        table.insert(0, "value", "estimate")
        return table[columns]

    @property
    def labels(self) -> Labels:
        from mmflow.analyses.knockout_figures import knockout_order

        per = "per head and source token" if self.patches else "per head"
        return Labels(
            variant=f"attribution_{self.spec.name}",
            legend=f"{self.spec.label} (attribution {per})",
            tags=(
                str(self.config["model"]["name"]),
                str(self.config["task"]),
                f"window={self.width}",
                self.name,
            ),
            order=(knockout_order(self.spec.name), self.width),
            window=self.width,
        )

    @classmethod
    def report_sections(cls, cells: Sequence[Any]) -> list:
        from mmflow.analyses.attribution_figures import attribution_sections

        return attribution_sections(cells)
