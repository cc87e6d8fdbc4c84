"""Row planning of the fast engine: which jobs form a row, where each row starts, what it blocks.

A job becomes a row of the suffix t..T-1 (t: its first target, `first_target_of`), joining the batch at
its window's first layer; rows with the same first target form a `SuffixGroup`. `Rows` precomputes,
once per sweep, each row's window and edge set (targets, blocked suffix pairs, additive prefix mask);
`LayerBlocks` is what the active rows block in one layer. `plan_sweeps` bounds the suffix tokens of
one pass over the layers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from mmflow.knockout.spec import KnockoutJob

if TYPE_CHECKING:
    from mmflow.knockout.clean_pass import FastCleanPass

# Suffix tokens one pass over the layers may hold, in sequence lengths: bounds the MLP activations of a
# sweep near those of the clean pass (a custom knockout with an early target has ~T tokens per row).
SWEEP_TOKENS = 2


def first_target_of(job: KnockoutJob, n_layers: int) -> int | None:
    """The job's first target: the first position it can change, None if it blocks nothing.

    Its edges' first target (`BlockEdges.first_target`), except that targets before every source are
    skipped (causal attention: they cannot see a source), and a job with no layer or head changes nothing.
    """
    sources, targets = job.edges.sources, job.edges.targets
    if sources.numel() == 0 or targets.numel() == 0 or not any(0 <= j < n_layers for j in job.layers):
        return None
    if job.heads is not None and not job.heads:  # blocks in no head
        return None
    reachable = targets[targets >= sources.min()]
    return int(reachable.min()) if reachable.numel() else None


def plan_sweeps(by_first_target: dict[int, list[int]], length: int) -> list[dict[int, list[int]]]:
    """Split {first target: job indices} into sweeps of at most SWEEP_TOKENS x T suffix tokens (at least
    one row each).

    Short suffixes come first, so the first sweep holds the cheap suffix group the probe row joins.
    """
    batches: list[dict[int, list[int]]] = [{}]
    used = 0
    for first_target in sorted(by_first_target, reverse=True):
        for index in by_first_target[first_target]:
            if batches[-1] and used + length - first_target > SWEEP_TOKENS * length:
                batches.append({})
                used = 0
            batches[-1].setdefault(first_target, []).append(index)
            used += length - first_target
    return [batch for batch in batches if batch]


@dataclass
class SuffixGroup:
    """A suffix group: the rows whose first target is `first_target` (t); each recomputes the S = T - t
    suffix positions."""

    first_target: int
    rows: Rows
    hidden: torch.Tensor  # [R_active, S, D]: rows join at their start layer
    cos: torch.Tensor  # [S, d]: the clean run's rotary tables at positions t..T-1
    sin: torch.Tensor

    @classmethod
    def build(
        cls, clean: FastCleanPass, first_target: int, indices: list[int], jobs: Sequence[KnockoutJob]
    ) -> SuffixGroup:
        """The group of jobs[i] for i in `indices` (-1: a probe row that blocks nothing, from layer 0)."""
        offset = first_target - clean.first_target
        rows = Rows.build(indices, jobs, first_target, clean)
        return cls(first_target, rows, clean.hidden[:1, offset:][:0], clean.cos[offset:], clean.sin[offset:])

    def join(self, layer: int, clean: FastCleanPass) -> None:
        """Add the rows that start at `layer`, with the clean input of that layer."""
        joining = self.rows.starts.count(layer)
        if joining:
            fresh = clean.hidden[layer, self.first_target - clean.first_target :].expand(joining, -1, -1)
            self.hidden = torch.cat([self.hidden, fresh])


@dataclass(frozen=True)
class LayerBlocks:
    """What the active rows block in one layer, gathered per chunk of rows (window None: nothing)."""

    window: torch.Tensor | None = None  # [R] bool: the layer is inside the row's window
    pattern: torch.Tensor | None = None  # [R] long: the row's edge set
    rows: Rows | None = None
    heads: torch.Tensor | None = None  # [R, H] bool: the row blocks in this head (None: every head)

    @property
    def blocks_suffix(self) -> bool:
        return self.window is not None and bool((self.window & self.rows.suffix_any[self.pattern]).any())

    def suffix(self, chunk: slice, n_q: int) -> torch.Tensor:
        """Blocked (query, suffix key) pairs [r, Hm, Sq, S] of the rows in `chunk`, for the last Sq
        queries; Hm = 1 (every head) or H (per-head jobs)."""
        cut = (self.rows.suffix[:, -n_q:][self.pattern[chunk]] & self.window[chunk, None, None])[:, None]
        return cut if self.heads is None else cut & self.heads[chunk, :, None, None]

    def prefix_sets(self, n_q: int) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """(queries [R, Sq] bool, or [R, H, Sq] for per-head jobs; additive prefix mask [P], None if all
        blocked) per restricting edge set."""
        if self.window is None:
            return []
        targets = self.rows.targets[:, -n_q:][self.pattern] & self.window[:, None]  # [R, Sq]
        sets = []
        for u, prefix_mask in enumerate(self.rows.prefix_masks):
            chosen = targets & (self.pattern == u)[:, None]
            if self.heads is not None:
                chosen = chosen[:, None] & self.heads[:, :, None]
            if prefix_mask is not None and chosen.any():
                sets.append((chosen, None if self.rows.prefix_all[u] else prefix_mask))
        return sets


def edge_set(
    job: KnockoutJob | None, first_target: int, clean: FastCleanPass
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One edge set over the suffix first_target..T-1: (targets [S] bool, blocked suffix pairs [S, S] bool,
    additive prefix mask [first_target] with -inf at sources, or None if no source precedes first_target).
    """
    length, device = clean.inputs.length, clean.keys[0].device
    is_source = torch.zeros(length, dtype=torch.bool, device=device)
    is_target = torch.zeros(length - first_target, dtype=torch.bool, device=device)
    if job is not None:
        is_source[job.edges.sources.to(device)] = True
        is_target = torch.isin(
            torch.arange(first_target, length, device=device), job.edges.targets.to(device)
        )
    prefix = (
        additive(is_source[:first_target], clean.keys[0].dtype) if is_source[:first_target].any() else None
    )
    return is_target, is_target[:, None] & is_source[None, first_target:], prefix


@dataclass(frozen=True)
class Rows:
    """The rows of one sweep over the suffix first_target..T-1 (S positions), precomputed once.

    Rows are jobs sorted by start layer (a row joins the batch there); U distinct edge sets are shared.
    """

    jobs: list[int]  # [R] index of each row's job in `run` (-1: the probe row)
    starts: list[int]  # [R] first recomputed layer of each row, non-decreasing
    window: torch.Tensor  # [R, L] bool: the row blocks its edges in this layer
    pattern: torch.Tensor  # [R] long: the row's edge set
    targets: torch.Tensor  # [U, S] bool: the suffix position is a target of the edge set
    suffix: torch.Tensor  # [U, S, S] bool: blocked (target, source) pairs inside the suffix
    suffix_any: torch.Tensor  # [U] bool: the edge set blocks some pair inside the suffix
    prefix_masks: tuple[torch.Tensor | None, ...]  # U x [P] float: -inf at prefix sources (None: none)
    prefix_all: tuple[bool, ...]  # U: every prefix key is a source
    causal: torch.Tensor  # [S, S] float: 0 on and below the diagonal, -inf above
    blocking_layers: list[bool]  # [L]: some row blocks something in this layer
    heads: tuple[tuple[int, ...] | None, ...] = ()  # [R] the row's blocked heads (None: every head)

    @classmethod
    def build(
        cls, indices: list[int], jobs: Sequence[KnockoutJob], first_target: int, clean: FastCleanPass
    ) -> Rows:
        """Rows for jobs[i], i in `indices` (-1: a probe row from layer 0), sorted by start layer."""
        n_layers = len(clean.keys)
        start = {i: 0 if i < 0 else min(j for j in jobs[i].layers if 0 <= j < n_layers) for i in indices}
        indices = sorted(indices, key=start.__getitem__)
        row_jobs = [None if i < 0 else jobs[i] for i in indices]
        index_of: dict[int, int] = {}  # id(edges) -> edge set
        edge_sets = []
        for job in row_jobs:
            key = -1 if job is None else id(job.edges)
            if key not in index_of:
                index_of[key] = len(edge_sets)
                edge_sets.append(edge_set(job, first_target, clean))
        device = clean.keys[0].device
        window = [[job is not None and j in job.layers for j in range(n_layers)] for job in row_jobs]
        window = torch.tensor(window, dtype=torch.bool, device=device)
        suffix_length = clean.inputs.length - first_target
        upper = torch.ones(suffix_length, suffix_length, dtype=torch.bool, device=device).triu(1)
        return cls(
            jobs=indices,
            starts=[start[i] for i in indices],
            window=window,
            pattern=torch.tensor(
                [index_of[-1 if j is None else id(j.edges)] for j in row_jobs], device=device
            ),
            targets=torch.stack([targets for targets, _, _ in edge_sets]),
            suffix=torch.stack([suffix for _, suffix, _ in edge_sets]),
            suffix_any=torch.stack([suffix.any() for _, suffix, _ in edge_sets]),
            prefix_masks=tuple(prefix for _, _, prefix in edge_sets),
            prefix_all=tuple(prefix is not None and bool(prefix.isinf().all()) for _, _, prefix in edge_sets),
            causal=additive(upper, clean.keys[0].dtype),
            blocking_layers=window.any(0).tolist(),
            heads=tuple(None if job is None else job.heads for job in row_jobs),
        )

    def at_layer(self, layer: int, n_rows: int, n_heads: int) -> LayerBlocks:
        """What the first `n_rows` rows (the active ones) of `n_heads` query heads block in `layer`."""
        if not self.blocking_layers[layer]:
            return LayerBlocks()
        heads = None
        if any(h is not None for h in self.heads[:n_rows]):
            heads = torch.ones(n_rows, n_heads, dtype=torch.bool)
            for row, chosen in enumerate(self.heads[:n_rows]):
                if chosen is not None:
                    heads[row] = False
                    heads[row, list(chosen)] = True
            heads = heads.to(self.window.device)
        return LayerBlocks(self.window[:n_rows, layer], self.pattern[:n_rows], self, heads)


def additive(blocked: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Bool -> additive mask: -inf where blocked, 0 elsewhere."""
    return torch.zeros(blocked.shape, dtype=dtype, device=blocked.device).masked_fill_(blocked, float("-inf"))
