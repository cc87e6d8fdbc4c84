"""Figure files of the report: names, PNG + PDF files, PNG bytes for W&B.

The figures themselves belong to the analyses (`Analysis.figure`, `Analysis.report_sections`); the
knockout figures are re-exported here for callers of the report.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from mmflow.analyses.curves import curve_stats
from mmflow.analyses.knockout_figures import plot_cross_model, plot_model_overview, plot_model_task

__all__ = [
    "curve_stats",
    "plot_cross_model",
    "plot_model_overview",
    "plot_model_task",
    "FigureCache",
    "draw_figures",
    "cells_key",
    "png_bytes",
    "save_figure",
    "slug",
]


def slug(*parts: object) -> str:
    """A file-name-safe stem from `parts`."""
    return "__".join(re.sub(r"[^A-Za-z0-9._-]+", "-", str(p)).strip("-") for p in parts)


def save_figure(figure: Figure, out_dir: Path, stem: str) -> dict[str, Path]:
    """Write `stem.png` (150 dpi) and `stem.pdf` into `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"png": out_dir / f"{stem}.png", "pdf": out_dir / f"{stem}.pdf"}
    figure.savefig(paths["png"], dpi=150)
    figure.savefig(paths["pdf"])
    return paths


def png_bytes(figure: Figure, dpi: int = 110) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


FIGURE_VERSION = 1  # bump when the drawing code changes what the same cells look like


def content_key(spec: Any) -> str | None:
    """A key of what a figure draws: its caption and its cells (`cells_key`); None for a figure that
    names no cells (always drawn)."""
    cells: Sequence[Any] = getattr(spec, "cells", ())
    return cells_key(cells, spec.caption) if cells else None


def cells_key(cells: Sequence[Any], *extra: Any) -> str:
    """A key of the content of `cells`: per cell its id and the size and modification time of its
    cell.json and results.parquet (a recomputed cell rewrites both), plus `extra`."""
    parts: list[Any] = [FIGURE_VERSION, *extra]
    for cell in cells:
        stats = []
        for name in ("cell.json", "results.parquet"):
            try:
                st = (Path(cell.dir) / name).stat()
                stats.append((st.st_size, st.st_mtime_ns))
            except OSError:
                stats.append(None)
        parts.append((cell.cell_id, stats))
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:20]


class FigureCache:
    """`figures/cache.json`: stem -> content key of the files written for it, so a report redraws
    only figures whose cells are new or changed."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.path = folder / "cache.json"
        try:
            self.keys: dict[str, str] = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.keys = {}

    def get(self, stem: str, spec: Any) -> dict[str, Path] | None:
        key = content_key(spec)
        paths = {"png": self.folder / f"{stem}.png", "pdf": self.folder / f"{stem}.pdf"}
        if key is not None and self.keys.get(stem) == key and all(p.exists() for p in paths.values()):
            return paths
        return None

    def put(self, stem: str, spec: Any) -> None:
        key = content_key(spec)
        if key is None:
            self.keys.pop(stem, None)
        else:
            self.keys[stem] = key

    def save(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.keys, indent=0, sort_keys=True))


_PENDING: list[Any] = []  # what forked drawing processes draw (inherited, never pickled)
PARALLEL_FROM = 8  # fewer figures than this are drawn here


def _draw_one(index: int, folder: str) -> tuple[str, str | None]:
    spec = _PENDING[index]
    try:
        save_figure(spec.figure, Path(folder), slug(spec.stem))
        return spec.stem, None
    except Exception as exc:  # noqa: BLE001 - one figure must not break the report
        return spec.stem, f"{type(exc).__name__}: {exc}"


def report_workers(workers: int | None) -> int:
    import os

    if workers is None:
        workers = int(os.environ.get("MMFLOW_REPORT_WORKERS") or min(4, os.cpu_count() or 1))
    return max(1, workers)


def draw_figures(specs: Sequence[Any], folder: Path, workers: int | None = None) -> dict[str, str]:
    """Draw and save `specs` into `folder` (forked processes when there are enough of them and
    more than one worker); returns stem -> error of the figures that failed."""
    import multiprocessing

    global _PENDING
    folder.mkdir(parents=True, exist_ok=True)
    n = report_workers(workers)
    _PENDING = list(specs)
    try:
        if n > 1 and len(_PENDING) >= PARALLEL_FROM and "fork" in multiprocessing.get_all_start_methods():
            with multiprocessing.get_context("fork").Pool(min(n, len(_PENDING))) as pool:
                results = pool.starmap(_draw_one, [(i, str(folder)) for i in range(len(_PENDING))])
        else:
            results = [_draw_one(i, str(folder)) for i in range(len(_PENDING))]
    finally:
        _PENDING = []
    return {stem: error for stem, error in results if error is not None}
