"""Cells drawn together that differ in a key the figure does not vary are told apart by name.

The trial's case: a shapes cell and a `data=table` cell of one model, task and knockout in one results
folder gave two same-coloured lines both labelled "Image ↛ Question". Now the labels (and the cells
table) say what differs; figures of cells that differ only in what is plotted keep their labels.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mmflow.analyses.knockout_figures import plot_cross_model, plot_model_overview, plot_model_task
from mmflow.analyses.patching_figures import plot_necessity_sufficiency
from mmflow.knockout.spec import NAMED_KNOCKOUTS
from mmflow.report import build_report
from mmflow.storage.cell_data import find_cell_dirs, load_cells
from mmflow.storage.store import atomic_write_json, atomic_write_parquet, cell_id

SHAPES = {"name": "shapes", "seed": 0, "cache_dir": None}
TABLE = {"name": "table", "path": "/u/vqa.csv", "image_dir": "/u/imgs", "format": "csv", "sha256": "ab" * 32}


def fabricate(root: Path, model="m8", knockout="image_to_question", task="ChooseAttr", **changes) -> Path:
    """A done knockout cell of 3 samples x 8 layers with `changes` in its config."""
    source, target = NAMED_KNOCKOUTS[knockout]
    config = {
        "analysis": "knockout",
        "model": {"name": model, "n_layers": 8},
        "data": SHAPES,
        "task": task,
        "knockout": {"name": knockout, "source": source, "target": target},
        "window": 3,
        "n_samples": 3,
        "results_dir": str(root),
        **changes,
    }
    cell_dir = root / cell_id(config)
    rng = np.random.default_rng(len(cell_dir.name))
    results = [
        {"question_id": f"q{s}", "layer": layer, "rel_change_pct": float(rng.normal())}
        for s in range(3)
        for layer in range(8)
    ]
    samples = {"question_id": ["q0", "q1", "q2"], "status": "scored", "correct": True}
    atomic_write_parquet(cell_dir / "results.parquet", pd.DataFrame(results))
    atomic_write_parquet(cell_dir / "samples.parquet", pd.DataFrame(samples))
    meta = {"cell_id": cell_id(config), "status": "done", "config": config}
    atomic_write_json(cell_dir / "cell.json", meta)
    return cell_dir


def cells_of(root: Path) -> list:
    return load_cells(find_cell_dirs(root))[0]


def labels(ax) -> list[str]:
    return sorted(line.get_label() for line in ax.get_lines() if not line.get_label().startswith("_"))


def analysis_column(root: Path) -> list[str]:
    html = build_report(root).read_text()
    rows = [re.findall(r"<td[^>]*>(.*?)</td>", r, re.S) for r in re.findall(r"<tr>(.*?)</tr>", html, re.S)]
    return sorted(row[2] for row in rows if row)


def test_cells_of_two_data_sources_are_named_in_every_figure_and_the_table(tmp_path):
    fabricate(tmp_path)
    fabricate(tmp_path, data=TABLE)
    fabricate(tmp_path, model="m12", data=TABLE)
    cells = cells_of(tmp_path)
    m8 = [c for c in cells if c.model == "m8"]
    expected = ["Image ↛ Question (data=shapes)", "Image ↛ Question (data=table)"]
    ax = plot_model_task(m8).axes[0]
    assert labels(ax) == expected
    assert len({line.get_linestyle() for line in ax.get_lines() if not line.get_label().startswith("_")}) == 2
    assert labels(plot_necessity_sufficiency(m8, []).axes[0]) == expected
    cross = labels(plot_cross_model(cells).axes[0])
    assert cross == ["m12 (L = 8) (data=table)", "m8 (L = 8) (data=shapes)", "m8 (L = 8) (data=table)"]
    assert analysis_column(tmp_path) == ["Image ↛ Question", *expected]  # m12's row repeats nothing


def test_any_other_semantic_key_is_named(tmp_path):
    fabricate(tmp_path)
    fabricate(tmp_path, n_samples=8)
    fabricate(tmp_path, data={**TABLE, "sha256": "cd" * 32})
    fabricate(tmp_path, data=TABLE)
    got = labels(plot_model_task(cells_of(tmp_path)).axes[0])
    assert got == [
        "Image ↛ Question (data=shapes, n_samples=3)",
        "Image ↛ Question (data=shapes, n_samples=8)",
        "Image ↛ Question (data=table, data.sha256=abababab, n_samples=3)",
        "Image ↛ Question (data=table, data.sha256=cdcdcdcd, n_samples=3)",
    ]


def test_two_table_files_are_told_apart_by_digest(tmp_path):
    fabricate(tmp_path, data=TABLE)
    fabricate(tmp_path, data={**TABLE, "path": "/v/vqa.csv", "sha256": "cd" * 32})
    got = labels(plot_model_task(cells_of(tmp_path)).axes[0])
    assert got == ["Image ↛ Question (data.sha256=abababab)", "Image ↛ Question (data.sha256=cdcdcdcd)"]


@pytest.mark.slow
def test_the_usual_sweep_keeps_its_labels(tmp_path):
    for task in ("ChooseAttr", "QueryAttr"):
        for model in ("m8", "m12"):
            for knockout in ("image_to_question", "question_to_last"):
                fabricate(tmp_path, model=model, knockout=knockout, task=task)
    cells = cells_of(tmp_path)
    plain = ["Image ↛ Question", "Question ↛ Last"]
    one = [c for c in cells if c.model == "m8" and c.task == "ChooseAttr"]
    assert labels(plot_model_task(one).axes[0]) == plain
    overview = plot_model_overview([c for c in cells if c.model == "m8"])
    assert [t.get_text() for t in overview.legends[0].get_texts()] == plain
    cross = [c for c in cells if c.task == "ChooseAttr" and c.variant == "image_to_question"]
    assert labels(plot_cross_model(cross).axes[0]) == ["m12 (L = 8)", "m8 (L = 8)"]
    assert labels(plot_necessity_sufficiency(one, []).axes[0]) == plain
    assert set(analysis_column(tmp_path)) == set(plain)


def test_paths_are_shortened_only_as_far_as_they_stay_distinct():
    from types import SimpleNamespace

    from mmflow.analyses.plots import distinguishing_notes

    base = {"model": {"name": "m"}, "task": "ChooseAttr", "data": TABLE}
    cells = [
        SimpleNamespace(config={**base, "data": {**TABLE, "image_dir": d}}) for d in ("/a/imgs", "/b/imgs")
    ]
    assert distinguishing_notes(cells) == [" (data.image_dir=a/imgs)", " (data.image_dir=b/imgs)"]
    assert distinguishing_notes(cells, ("data",)) == ["", ""]
