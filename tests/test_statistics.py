"""Issue 23, items 10-11: honest bands (Student's t, none below two samples, n beside every curve),
per-head curves over samples, a heat map centred on 0, and patching noise that is the same for a
question in every cell."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from conftest import cell_config

from mmflow.analyses.base import analysis_for
from mmflow.analyses.curves import curve_stats
from mmflow.analyses.patching_figures import diverging_norm, plot_head_heatmap, strongest_heads
from mmflow.analyses.plots import band, new_figure


def test_band_is_students_t_and_absent_below_two_samples():
    values = {0: [1.0, 2.0, 6.0], 1: [4.0]}  # n = 3 at layer 0, n = 1 at layer 1
    results = pd.DataFrame([{"layer": k, "x": v} for k, vs in values.items() for v in vs])
    stats = curve_stats(results, "x").set_index("layer")
    sem = np.std(values[0], ddof=1) / np.sqrt(3)
    t = 4.302652729749462  # t(0.975, 2 degrees of freedom); z = 1.96 would be 2.2x too narrow
    assert stats.loc[0, "ci_high"] - stats.loc[0, "mean"] == pytest.approx(t * sem)
    assert stats.loc[0, "mean"] - stats.loc[0, "ci_low"] == pytest.approx(t * sem)
    assert stats.loc[1, "n"] == 1 and stats.loc[1, "mean"] == 4.0
    assert np.isnan(stats.loc[1, "ci_low"]) and np.isnan(stats.loc[1, "ci_high"])  # not [4, 4]


def test_every_curve_is_labelled_with_its_scored_n():
    results = pd.DataFrame([{"layer": layer, "x": v} for layer in range(3) for v in (1.0, 2.0, 4.0, 3.0)])
    figure, ax = new_figure()
    band(ax, np.arange(3), curve_stats(results, "x"), "C0", "Image ↛ Last")
    one = curve_stats(results.head(1), "x")
    band(ax, np.arange(1), one, "C1", "Question ↛ Last")
    assert [text.get_text() for text in ax.texts] == ["n = 4", "n = 1"]  # beside each curve
    assert len(ax.collections) == 1  # the n = 1 curve has no band


def _per_head_results(n_samples: int, n_heads: int, layers: int = 2) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    return pd.DataFrame(
        [
            {
                "question_id": f"q{s}",
                "layer": layer,
                "head": h,
                "rel_change_pct": float(rng.normal(-2.0 * h, 1.0)),
                "logp_change": float(rng.normal()),
                "top1_changed": bool(h == 0),
            }
            for s in range(n_samples)
            for layer in range(layers)
            for h in range(n_heads)
        ]
    )


def test_per_head_curve_counts_samples_not_heads_times_samples(tmp_path):
    knockout = {"name": "image_to_last", "source": "image", "target": "last", "heads": "each"}
    analysis = analysis_for(cell_config(tmp_path, knockout=knockout))
    results = _per_head_results(n_samples=4, n_heads=4)
    table = analysis.curve_table(results)
    assert table["n"].tolist() == [4, 4]  # was 16: 4 heads x 4 samples pooled as if independent
    per_sample = results.groupby(["question_id", "layer"])["rel_change_pct"].mean()
    expected = per_sample.groupby(level="layer").agg(["mean", "std"])
    np.testing.assert_allclose(table["mean"], expected["mean"])
    np.testing.assert_allclose(table["sem"], expected["std"] / 2.0)
    heads = strongest_heads(results, top=2)
    assert heads["n"].tolist() == [4, 4]
    assert heads["ci95"].iloc[0] == pytest.approx(3.182446305284263 * heads["sem"].iloc[0])  # t(0.975, 3)


def test_head_heat_map_is_centred_on_zero_and_symmetric():
    norm = diverging_norm(np.array([[0.34, -9.2], [-1.0, 0.0]]))
    assert norm(0.0) == pytest.approx(0.5)
    assert norm(0.34) - 0.5 == pytest.approx(0.34 / 9.2 / 2)  # faint, not as dark as the -9.2 drop
    assert norm(-9.2) == pytest.approx(0.0)
    results = _per_head_results(n_samples=2, n_heads=3)
    cell = SimpleNamespace(
        results=results,
        model="tiny",
        model_title="tiny",
        task="ChooseAttr",
        window=1,
        analysis=SimpleNamespace(spec=SimpleNamespace(label="Image ↛ Last")),
    )
    (image,) = plot_head_heatmap(cell).axes[0].images
    assert image.norm.vmin == -image.norm.vmax


# ---------------------------------------------------------------- patching noise (item 11)


def test_noise_seed_depends_on_task_and_data_source():
    from mmflow.patching.corrupt import seed_for

    seeds = {seed_for(0, "q1", task, source) for task in ("ChooseAttr", "ChooseCat") for source in ("a", "b")}
    assert len(seeds) == 4  # the same id in two tasks or two sources gets its own draw


@pytest.mark.slow
def test_patching_noise_is_a_property_of_model_and_data_source(tmp_path):
    import json
    from pathlib import Path

    from mmflow.execution.runtime import run_cells
    from mmflow.models.registry import get_model
    from mmflow.storage.cell_data import load_cell

    base = cell_config(tmp_path, analysis="patching", corruption="noise", window=1)
    base["patching"] = {"groups": ["image"], "noise_scale": 3.0, "margin": 0.0, "calibration_per_task": 2}
    loaded = get_model(base["model"])
    (one,) = run_cells(loaded, [{**base, "n_samples": 1}])
    (two,) = run_cells(loaded, [{**base, "n_samples": 2}])
    assert one.status == two.status == "done", (one.error, two.error)
    first = [pd.read_parquet(Path(o.path) / "results.parquet").iloc[0] for o in (one, two)]
    assert first[0]["question_id"] == first[1]["question_id"]
    assert first[0]["corrupt_source"] == first[1]["corrupt_source"]  # same sd, same seed: same noise
    assert first[0]["p_corrupt"] == first[1]["p_corrupt"]
    meta = [json.loads((Path(o.path) / "cell.json").read_text()) for o in (one, two)]
    calibration = meta[0]["noise_calibration"]
    assert calibration == meta[1]["noise_calibration"] and len(calibration["question_ids"]) >= 2
    assert f"sd={calibration['noise_sd']:.6g}" in first[0]["corrupt_source"]
    ax = load_cell(two.path).analysis.figure(load_cell(two.path)).axes[0]
    assert any(t.get_text().startswith("n = ") for t in ax.texts)  # the scored count beside the curve

    configured = {**base, "patching": {**base["patching"], "noise_sd": 0.5}}
    (fixed,) = run_cells(loaded, [configured])
    row = pd.read_parquet(Path(fixed.path) / "results.parquet").iloc[0]
    assert "sd=0.5 " in row["corrupt_source"]
    assert (
        json.loads((Path(fixed.path) / "cell.json").read_text())["noise_calibration"]["how"] == "configured"
    )
