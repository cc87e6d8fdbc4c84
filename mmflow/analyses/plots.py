"""Figure primitives shared by the analyses' figures, on matplotlib's Agg canvas (no pyplot state),
so figures are safe to draw in any process, a Ray actor included; and the notes that tell apart
cells drawn together which differ in a key the figure does not show (`distinguishing_notes`)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

PALETTE = [f"C{i}" for i in range(10)]
LINESTYLES = ["-", "--", ":", "-."]  # one per window width, when a figure has several
BAND_NOTE = "band: 95% t interval of the mean, none where n < 2"


def new_figure(width: float = 7.0, height: float = 4.2) -> tuple[Figure, object]:
    """A figure on the Agg canvas and its single axis."""
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure, figure.add_subplot()


def new_grid(rows: int, columns: int, width: float, height: float) -> tuple[Figure, np.ndarray]:
    """A figure of rows × columns panels sharing both axes, and its flattened axes."""
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure, figure.subplots(rows, columns, sharex=True, sharey=True, squeeze=False).flatten()


def n_text(counts: Iterable[int]) -> str:
    """The scored sample count of a curve: "n = 4", or "n = 3–4" when its layers differ."""
    counts = sorted({int(c) for c in counts})
    if not counts:
        return "n = 0"
    return f"n = {counts[0]}" if len(counts) == 1 else f"n = {counts[0]}–{counts[-1]}"


def band(ax, x: np.ndarray, stats: pd.DataFrame, color: str, label: str, style: str = "-") -> None:
    """The curve `stats["mean"]` against `x` with its 95% band (`ci_low`..`ci_high`; none where they
    are NaN, n < 2) and its scored n written at its last point."""
    ax.plot(x, stats["mean"], style, marker="o", ms=3, lw=1.6, color=color, label=label, clip_on=False)
    if "n" in stats and len(stats):
        ax.annotate(
            n_text(stats["n"]),
            (float(np.asarray(x)[-1]), float(stats["mean"].iloc[-1])),
            xytext=(4, 0),
            textcoords="offset points",
            fontsize=6,
            color=color,
            va="center",
            annotation_clip=False,
        )
    low, high = stats["ci_low"].astype(float), stats["ci_high"].astype(float)
    if (low.notna() & high.notna()).any():
        ax.fill_between(x, low, high, color=color, alpha=0.18, lw=0)


def noise_floor_of(cells: Iterable[Any]) -> float | None:
    """The largest recorded numerical noise floor (% of p(answer), `cell.json` `noise_floor`) of
    `cells`, None when none recorded one (cells from before it was measured)."""
    floors = [
        ((getattr(cell, "meta", None) or {}).get("noise_floor") or {}).get("rel_change_pct") for cell in cells
    ]
    floors = [float(f) for f in floors if f is not None]
    return max(floors) if floors else None


def noise_band(ax, floor: float | None, label: str = "numerical noise floor") -> None:
    """A grey band ±`floor` around 0: effects inside it are rounding noise of the dtype and engine."""
    if floor is None or not np.isfinite(floor) or floor <= 0:
        return
    ax.axhspan(-floor, floor, color="0.5", alpha=0.22, lw=0, zorder=0, label=f"{label} (±{floor:.2g})")


# ---------------------------------------------------------------- what tells drawn cells apart

UNSET = "unset"


def _leaves(value: Any, prefix: str = "") -> dict[str, Any]:
    """A config as dotted keys -> leaf values (a mapping's `name` kept as the mapping's own value)."""
    if not isinstance(value, Mapping):
        return {prefix: value}
    out: dict[str, Any] = {}
    for key, sub in value.items():
        out.update(_leaves(sub, f"{prefix}.{key}" if prefix else str(key)))
    return out


def _shorten(values: Sequence[Any]) -> list[str]:
    """Values as a legend shows them: digests to 8 characters, paths to the fewest trailing parts
    that still tell them apart (`a/imgs`, `b/imgs`), long text cut at 32 characters."""
    texts = [v if isinstance(v, str) else json.dumps(v, default=str) for v in values]
    if all(re.fullmatch(r"[0-9a-f]{40,}", t) for t in texts):
        return [t[:8] for t in texts]
    if all("/" in t and " " not in t for t in texts):
        parts = [t.rstrip("/").split("/") for t in texts]
        for n in range(1, max(map(len, parts)) + 1):
            short = ["/".join(p[-n:]) for p in parts]
            if len(set(short)) == len(set(texts)):
                return short
    return [t if len(t) <= 32 else t[:31] + "…" for t in texts]


def _values(leaves: Sequence[Mapping[str, Any]], key: str) -> set[str]:
    return {json.dumps(flat.get(key, UNSET), default=str) for flat in leaves}


def differing_keys(configs: Sequence[Mapping[str, Any]], varied: Iterable[str] = ()) -> list[str]:
    """The semantic keys (dotted, `mmflow.storage.store.semantic_config`) whose values differ among
    `configs`, leaving out `varied` and the keys below them (what the figure shows anyway).

    A mapping whose `name` differs is named by that key (`data`); its other keys only where they
    differ between configs of one name (two table files: `data.sha256`, not shapes' `data.seed`).
    """
    from mmflow.analyses.base import canonical_config
    from mmflow.storage.store import semantic_config

    varied = tuple(varied)
    leaves = [_leaves(semantic_config(canonical_config(dict(c)))) for c in configs]
    out: set[str] = set()
    for key in set().union(*leaves):
        if any(key == v or key.startswith(v + ".") for v in varied) or len(_values(leaves, key)) < 2:
            continue
        if key.endswith(".name"):
            out.add(key.removesuffix(".name"))
            continue
        parts = key.split(".")
        named = [
            ".".join(parts[:i])
            for i in range(1, len(parts))
            if len(_values(leaves, ".".join(parts[:i]) + ".name")) > 1
        ]
        groups: dict[tuple, list] = {}
        for flat in leaves:  # configs of one name for each mapping whose name differs
            groups.setdefault(
                tuple(json.dumps(flat.get(f"{n}.name"), default=str) for n in named), []
            ).append(flat)
        if any(len(_values(group, key)) > 1 for group in groups.values()):
            out.add(key)
    return sorted(out)


def distinguishing_notes(cells: Sequence[Any], varied: Iterable[str] = ()) -> list[str]:
    """Per cell (`.config`), " (key=value, ...)" naming the keys that differ among `cells` beyond
    `varied` (`differing_keys`; a key a cell lacks is left out of its note); "" for every cell when
    they differ only in what is `varied`."""
    keys = differing_keys([cell.config for cell in cells], varied)
    flats = [_leaves(dict(cell.config)) for cell in cells]
    columns = []
    for key in keys:
        values = [flat.get(f"{key}.name", flat.get(key, UNSET)) for flat in flats]
        shown = iter(_shorten([v for v in values if v != UNSET]))
        columns.append([f"{key}={next(shown)}" if v != UNSET else "" for v in values])
    notes = []
    for parts in zip(*columns, strict=True) if columns else [()] * len(cells):
        parts = [p for p in parts if p]  # a key a cell lacks is left out of its note
        notes.append(f" ({', '.join(parts)})" if parts else "")
    return notes
