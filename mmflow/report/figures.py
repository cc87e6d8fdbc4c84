"""Figure files of the report: names, PNG + PDF files, PNG bytes for W&B.

The figures themselves belong to the analyses (`Analysis.figure`, `Analysis.report_sections`); the
knockout figures are re-exported here for callers of the report.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

from matplotlib.figure import Figure

from mmflow.analyses.curves import curve_stats
from mmflow.analyses.knockout_figures import plot_cross_model, plot_model_overview, plot_model_task

__all__ = [
    "curve_stats",
    "plot_cross_model",
    "plot_model_overview",
    "plot_model_task",
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
