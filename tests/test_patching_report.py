"""Report and W&B for issue 18: patching curves beside knockout curves, the per-head heat map."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import cell_config, model_config
from test_wandb_logger import inspect, logger_section, of_type, run_dirs

from mmflow.analyses.patching_figures import (
    head_table,
    patching_curves,
    plot_necessity_sufficiency,
    strongest_heads,
)
from mmflow.report import build_report
from mmflow.storage.cell_data import load_cell


@pytest.fixture(scope="module")
def cells(tmp_path_factory):
    """A knockout, a patching and a per-head knockout cell of tiny-llava, computed together and logged."""
    from mmflow.execution.runtime import run_cells
    from mmflow.models.registry import get_model
    from mmflow.wandb_logger import cell_logger

    tmp = tmp_path_factory.mktemp("patching_report")
    base = cell_config(
        tmp / "results",
        n_samples=2,
        engine={"name": "fast", "attention": "sdpa"},
        logger=logger_section(tmp / "wb"),
        corruption="noise",
        patching={"groups": ["image", "last"], "noise_scale": 3.0, "margin": 0.0},
    )
    configs = [
        dict(base, knockout={"name": "question_to_last", "source": "question", "target": "last"}),
        dict(base, analysis="patching"),
        dict(base, knockout={"name": "image_to_last", "source": "image", "target": "last", "heads": "each"}),
    ]
    loaded = get_model(model_config("tiny-llava"))
    outcomes = run_cells(loaded, configs, logger_factory=cell_logger)
    assert [o.status for o in outcomes] == ["done"] * 3, [o.error for o in outcomes]
    return {"tmp": tmp, "outcomes": outcomes, "loaded": loaded}


def test_report_has_patching_beside_knockout_and_head_heat_map(cells):
    tmp, outcomes = cells["tmp"], cells["outcomes"]
    index = build_report(tmp / "results", tmp / "report")
    html = index.read_text()
    assert "Necessity (knockout) and sufficiency (patching)" in html
    assert "Head-resolved knockouts (layer x head)" in html
    figures = {p.name for p in (tmp / "report" / "figures").glob("*.png")}
    assert any(name.startswith("patching__tiny-llava__ChooseAttr__3") for name in figures)
    assert any(name.startswith("heads__tiny-llava__ChooseAttr__image_to_last") for name in figures)
    assert "is not" not in html and "has no figure" not in html

    patching = load_cell(outcomes[1].path)
    alone = plot_necessity_sufficiency([], [patching])  # no knockout cell: one panel, its own title
    alone.canvas.draw()
    title = alone._suptitle
    assert title.get_text().endswith(": sufficiency (patching), k = 3")
    extent = title.get_window_extent()
    assert 0 <= extent.x0 and extent.x1 <= alone.bbox.width  # inside the figure, not cut at its edges
    curves = patching_curves(patching.results)
    expected = patching.results.groupby(["group", "layer"])["recovered_frac"].mean() * 100
    got = curves.set_index(["group", "layer"])["mean"]
    pd.testing.assert_series_equal(got.sort_index(), expected.sort_index(), check_names=False)

    heads = load_cell(outcomes[2].path)
    table = head_table(heads.results)
    n_heads = cells["loaded"].model.config.get_text_config().num_attention_heads
    assert table.shape == (cells["loaded"].n_layers, n_heads)
    top = strongest_heads(heads.results)
    assert len(top) == 3 and top["rel_change_pct"].is_monotonic_increasing
    assert top["rel_change_pct"].iloc[0] == pytest.approx(np.nanmin(table.to_numpy()))


@pytest.mark.slow
def test_wandb_logs_recovered_fraction_per_group_and_per_head_table(cells):
    root, outcomes = cells["tmp"] / "wb", cells["outcomes"]
    (run_dir,) = run_dirs(root, outcomes[1].cell_id)
    records, summary = inspect(run_dir)
    history = [h["item"] for h in of_type(records, "history")]
    results = pd.read_parquet(Path(outcomes[1].path) / "results.parquet")
    for group in ("image", "last"):
        rows = [h for h in history if f"curve/recovered_pct/{group}" in h]
        expected = results[results["group"] == group].groupby("layer")["recovered_frac"].mean() * 100
        np.testing.assert_allclose([h[f"curve/recovered_pct/{group}"] for h in rows], expected.to_numpy())
    assert summary["summary"]["figure"]["_type"] == "image-file"
    assert "max_recovered_pct/image" in summary["summary"]

    (run_dir,) = run_dirs(root, outcomes[2].cell_id)
    _, summary = inspect(run_dir)
    values = summary["summary"]
    assert values["per_layer_head"]["_type"] == "table-file"
    assert values["min_head"] == outcomes[2].summary["min_head"]
    assert values["min_rel_change_pct"] == pytest.approx(outcomes[2].summary["min_rel_change_pct"])
