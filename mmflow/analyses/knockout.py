"""The knockout analysis: windows of one block type -> per-layer change of the answer probability."""

from __future__ import annotations

import math

import torch

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


class KnockoutAnalysis:
    """Block `spec` in the window of width `width` around every centre layer 0..L-1."""

    kind = "knockout"
    result_columns = RESULT_COLUMNS
    sort_by = ["question_id", "layer"]

    def __init__(self, spec: KnockoutSpec, width: int, n_layers: int, labels: dict):
        self.spec = spec
        self.width = width
        self.n_layers = n_layers
        self.labels = labels  # model, task, knockout, window: constant columns of every row
        for centre in range(n_layers):
            window_layers(centre, width, n_layers)  # validates width early

    def jobs(self, groups: TokenGroups, sample: Sample | None = None) -> list[KnockoutJob]:
        """One job per centre layer; raises `GroupError` if a group is empty."""
        edges = BlockEdges(groups.require(self.spec.source), groups.require(self.spec.target))
        return [KnockoutJob(edges, window_layers(c, self.width, self.n_layers)) for c in range(self.n_layers)]

    def rows(self, sample: Sample, clean: CleanPass, token_id: int, new: torch.Tensor) -> list[dict]:
        """Rows for one sample: clean pass vs knocked-out last-position log-probs `new` [L, V]."""
        question_id = sample.question_id
        logp_base = float(clean.logprobs[token_id])
        p_base = math.exp(logp_base)
        top1 = new.argmax(dim=-1).tolist()
        out = []
        for layer in range(self.n_layers):
            logp_new = float(new[layer, token_id])
            p_new = math.exp(logp_new)
            out.append(
                {
                    "question_id": question_id,
                    "layer": layer,
                    "p_base": p_base,
                    "p_new": p_new,
                    "rel_change_pct": (p_new - p_base) / p_base * 100.0,
                    "logp_change": logp_new - logp_base,
                    "top1_changed": top1[layer] != token_id,
                    **self.labels,
                }
            )
        return out

    @staticmethod
    def headline(results) -> dict:
        """The curve's minimum (mean relative change over samples) and where it is."""
        if not len(results):
            return {}
        curve = results.groupby("layer")["rel_change_pct"].mean()
        return {"min_rel_change_pct": float(curve.min()), "min_layer": int(curve.idxmin())}
