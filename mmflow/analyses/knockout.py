"""The knockout analysis: windows of one block type -> per-layer change of the answer probability."""

from __future__ import annotations

import math
from collections.abc import Sequence

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


def head_sets(heads: str | int | Sequence[int] | None, n_heads: int) -> list[tuple[int, ...] | None]:
    """`knockout.heads` -> the head set of each job per centre layer: None (every head, one job),
    `each` (one job per head), or a list of heads blocked together (one job). ValueError if out of range."""
    if heads is None:
        return [None]
    if heads == "each":
        return [(h,) for h in range(n_heads)]
    chosen = (heads,) if isinstance(heads, int) else tuple(sorted({int(h) for h in heads}))
    if isinstance(heads, str) or not chosen or not all(0 <= h < n_heads for h in chosen):
        raise ValueError(f"knockout.heads must be null, 'each' or heads in 0..{n_heads - 1}, got {heads!r}")
    return [chosen]


class KnockoutAnalysis:
    """Block `spec` in the window of width `width` around every centre layer 0..L-1.

    With `heads` (see `head_sets`) the edges are blocked in those attention heads only; rows then
    record the head (`each`: column `head`, the head index) or the head set (a list: column `heads`,
    e.g. "0,2").
    """

    kind = "knockout"
    result_columns = RESULT_COLUMNS
    sort_by = ["question_id", "layer"]

    def __init__(
        self,
        spec: KnockoutSpec,
        width: int,
        n_layers: int,
        labels: dict,
        heads: str | int | Sequence[int] | None = None,
        n_heads: int = 0,
    ):
        self.spec = spec
        self.width = width
        self.n_layers = n_layers
        self.labels = labels  # model, task, knockout, window: constant columns of every row
        self.head_sets = head_sets(heads, n_heads)
        self.head_column = None if heads is None else "head" if heads == "each" else "heads"
        if self.head_column is not None:
            self.result_columns = RESULT_COLUMNS[:2] + [self.head_column] + RESULT_COLUMNS[2:]
            self.sort_by = ["question_id", "layer", self.head_column]
        for centre in range(n_layers):
            window_layers(centre, width, n_layers)  # validates width early

    def jobs(self, groups: TokenGroups, sample: Sample | None = None) -> list[KnockoutJob]:
        """One job per centre layer and head set (centre-major); raises `GroupError` if a group is empty."""
        edges = BlockEdges(groups.require(self.spec.source), groups.require(self.spec.target))
        return [
            KnockoutJob(edges, window_layers(c, self.width, self.n_layers), heads)
            for c in range(self.n_layers)
            for heads in self.head_sets
        ]

    def _head_value(self, heads: tuple[int, ...]) -> int | str:
        return heads[0] if self.head_column == "head" else ",".join(map(str, heads))

    def rows(self, sample: Sample, clean: CleanPass, token_id: int, new: torch.Tensor) -> list[dict]:
        """Rows for one sample: clean pass vs knocked-out last-position log-probs `new` [L, V]."""
        question_id = sample.question_id
        logp_base = float(clean.logprobs[token_id])
        p_base = math.exp(logp_base)
        top1 = new.argmax(dim=-1).tolist()
        out = []
        for index, (layer, heads) in enumerate((c, h) for c in range(self.n_layers) for h in self.head_sets):
            logp_new = float(new[index, token_id])
            p_new = math.exp(logp_new)
            row = {"question_id": question_id, "layer": layer}
            if heads is not None:
                row[self.head_column] = self._head_value(heads)
            row.update(
                {
                    "p_base": p_base,
                    "p_new": p_new,
                    "rel_change_pct": (p_new - p_base) / p_base * 100.0,
                    "logp_change": logp_new - logp_base,
                    "top1_changed": top1[index] != token_id,
                    **self.labels,
                }
            )
            out.append(row)
        return out

    def headline(self, results) -> dict:
        """The curve's minimum (mean relative change over samples) and where it is (and in which head)."""
        if not len(results):
            return {}
        if self.head_column == "head":
            curve = results.groupby(["layer", "head"])["rel_change_pct"].mean()
            layer, head = curve.idxmin()
            return {"min_rel_change_pct": float(curve.min()), "min_layer": int(layer), "min_head": int(head)}
        curve = results.groupby("layer")["rel_change_pct"].mean()
        return {"min_rel_change_pct": float(curve.min()), "min_layer": int(curve.idxmin())}
