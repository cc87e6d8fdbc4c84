"""What a knockout blocks: `KnockoutSpec` (source group -> target group) and its layer windows."""

from __future__ import annotations

from dataclasses import dataclass

import torch

# The paper's block types (docs/method.md, "Knockout") by config name.
NAMED_KNOCKOUTS: dict[str, tuple[str, str]] = {
    "image_to_question": ("image", "question"),
    "image_to_last": ("image", "last"),
    "question_to_last": ("question", "last"),
    "last_to_last": ("last", "last"),
    "object_to_question": ("object", "question"),
    "nonobject_to_question": ("nonobject", "question"),
}
GROUP_LABELS = {
    "image": "Image",
    "question": "Question",
    "last": "Last",
    "object": "Related image patches",
    "nonobject": "Other image patches",
    "true_option": "True option",
    "false_option": "False option",
}


@dataclass(frozen=True)
class KnockoutSpec:
    """Block `source -> target`: no position of `target` may attend to any position of `source`."""

    name: str
    source: str
    target: str

    @property
    def label(self) -> str:
        """The paper's legend text, e.g. "Image ↛ Question"."""
        return f"{GROUP_LABELS.get(self.source, self.source)} ↛ {GROUP_LABELS.get(self.target, self.target)}"


def window_layers(center: int, width: int, n_layers: int) -> range:
    """Layers blocked for centre `center`: max(0, l - floor(k/2)) <= j < min(L, l + ceil(k/2))."""
    if width < 1:
        raise ValueError(f"window width must be >= 1, got {width}")
    if not 0 <= center < n_layers:
        raise ValueError(f"centre layer {center} outside 0..{n_layers - 1}")
    return range(max(0, center - width // 2), min(n_layers, center + (width + 1) // 2))


@dataclass(frozen=True)
class BlockEdges:
    """Positions of one knockout on one sample: `targets` may not attend to `sources`."""

    sources: torch.Tensor  # [n_src] long
    targets: torch.Tensor  # [n_tgt] long

    def mask(self, q_positions: torch.Tensor, kv_length: int) -> torch.Tensor:
        """Boolean [len(q_positions), kv_length], True where attention is blocked."""
        rows = torch.isin(q_positions, self.targets.to(q_positions.device))
        cols = torch.zeros(kv_length, dtype=torch.bool, device=q_positions.device)
        cols[self.sources.to(q_positions.device)] = True
        return rows[:, None] & cols[None, :]

    @property
    def first_target(self) -> int:
        return int(self.targets.min())


@dataclass(frozen=True)
class KnockoutJob:
    """One forward's worth of knockout: which edges, in which layers, in which attention heads.

    `heads`: the (query) heads whose edges are blocked; None blocks them in every head (the paper's).
    """

    edges: BlockEdges
    layers: range
    heads: tuple[int, ...] | None = None
