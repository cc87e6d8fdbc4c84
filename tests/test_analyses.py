"""The analysis plug-ins: config group, cell ids kept from before, registry, and a new plug-in end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mmflow.analyses import (
    Analysis,
    FigureSpec,
    Labels,
    SamplePlan,
    analysis_class,
    analysis_for,
    known_analyses,
    register,
)
from mmflow.analyses.curves import curve_minimum, curve_stats
from mmflow.storage.store import atomic_write_json, atomic_write_parquet, cell_id

# Cell configs as the code on main (13f7c92, before analyses were a config group) composed and wrote
# them into cell.json, with the cell ids it gave them. Composed again from today's configs, each must
# get exactly the same id (a results folder computed then is found cached now).
OLD = json.loads((Path(__file__).parent / "data" / "cell_configs_main_13f7c92.json").read_text())
OLD_IDS = {
    (): "2202a75af02deb43",
    ("knockout=question_to_last", "window=3"): "6c233ed0a0b85d14",
    (
        "model=tiny-llava",
        "task=QueryAttr",
        "knockout=image_to_last",
        "window=1",
        "n_samples=4",
    ): "989c165c1cad0e29",
    (
        "model=tiny-llava-next",
        "engine=reference",
        "knockout=custom",
        "knockout.source=true_option",
        "knockout.target=last",
    ): "d76020352651be3b",
    (
        "model=llava-1.5-7b",
        "data=gqa",
        "data.image_dir=/data/gqa",
        "n_samples=1000",
        "knockout=last_to_last",
    ): "8eff4480e86ad7a3",
    ("analysis=answer_tracking",): "71ba20e2ebd5961e",
    ("analysis=answer_tracking", "lens=raw", "model=tiny-llava", "task=ChooseCat"): "43c474af464d2e5f",
    (
        "analysis=answer_tracking",
        "model=llama3-llava-next-8b",
        "data=gqa",
        "data.image_dir=/data/gqa",
    ): "fab5fae1447fb398",
    ("logger=none", "sweep_name=smoke", "results_dir=/elsewhere"): "2202a75af02deb43",
}


def compose(overrides: list[str]) -> dict:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from mmflow.cli import cell_config
    from mmflow.config.dirs import CONF_DIR

    if not any(o.startswith("results_dir=") for o in overrides):
        overrides = ["results_dir=/results", *overrides]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return cell_config(hydra_compose("config", overrides=overrides))


def semantic(config: dict) -> dict:
    from mmflow.storage.store import semantic_config

    return semantic_config(config)


@pytest.mark.parametrize("overrides", list(OLD_IDS), ids=lambda o: " ".join(o) or "default")
def test_cell_ids_are_those_of_the_code_before_analysis_plugins(overrides, monkeypatch):
    monkeypatch.delenv("GQA_IMAGE_DIR", raising=False)
    monkeypatch.delenv("MMFLOW_RESULTS", raising=False)
    (old,) = [case for case in OLD if tuple(case["overrides"]) == overrides]
    assert cell_id(old["config"]) == old["cell_id"] == OLD_IDS[overrides]  # the old shape
    new = compose(list(overrides))
    if new["model"].get("parity") is not None:
        # The paper's four checkpoints gained `model.parity` (issue 13): paper mode computes other token
        # positions than the code before, so their ids change on purpose; all else is the old dict.
        assert cell_id(new) != OLD_IDS[overrides]
        new = {**new, "model": {k: v for k, v in new["model"].items() if k != "parity"}}
    assert semantic(new) == semantic(old["config"])  # the new shape is the old semantic dict
    assert cell_id(new) == OLD_IDS[overrides]


def test_an_analysis_config_has_only_its_own_keys(monkeypatch):
    from hydra.errors import ConfigCompositionException

    tracking, knockout = compose(["analysis=answer_tracking"]), compose([])
    assert "knockout" not in tracking and "window" not in tracking and tracking["lens"] == "norm"
    assert "lens" not in knockout and knockout["window"] == knockout["model"]["default_window"]
    for bad in (
        ["lens=raw"],
        ["analysis=answer_tracking", "window=3"],
        ["analysis=answer_tracking", "knockout=x"],
    ):
        with pytest.raises(ConfigCompositionException):
            compose(bad)


def test_the_registry_finds_analyses_by_name():
    assert {"knockout", "answer_tracking"} <= set(known_analyses())
    assert analysis_class("knockout").name == "knockout"
    with pytest.raises(ValueError, match="unknown analysis 'nope'.*answer_tracking.*knockout"):
        analysis_class("nope")
    config = compose([])
    assert analysis_for({**config, "analysis": "knockout"}).labels.variant == "image_to_question"
    del config["window"]
    with pytest.raises(ValueError, match=r"needs config keys \['window'\]"):
        analysis_for(config)


def test_curve_stats_minimum_and_band_in_one_place():
    values = np.array([[1.0, -4.0, 3.0], [3.0, -8.0, 3.0]])
    results = pd.DataFrame(
        [{"layer": layer, "x": values[s, layer]} for s in range(2) for layer in range(3)],
    )
    stats = curve_stats(results, "x", scale=10.0, clip=(-70.0, 100.0))
    np.testing.assert_allclose(stats["mean"], [20.0, -60.0, 30.0])
    sem = values.std(axis=0, ddof=1) * 10.0 / np.sqrt(2)
    t = 12.706204736174698  # Student's t, 0.975 quantile, 1 degree of freedom
    np.testing.assert_allclose(stats["ci_high"], np.minimum(100.0, values.mean(axis=0) * 10.0 + t * sem))
    np.testing.assert_allclose(stats["ci_low"], np.maximum(-70.0, values.mean(axis=0) * 10.0 - t * sem))
    table = stats.assign(value="x")
    assert curve_minimum(table, "x") == {"min_x": -60.0, "min_layer": 1}
    one = curve_stats(results[results["layer"] == 0].head(1), "x")
    assert one.loc[0, "mean"] == 1.0 and one[["sem", "ci_low", "ci_high"]].isna().all(axis=None)  # no band


# ---------------------------------------------------------------- a new analysis plugs in


@register
class FlipRate(Analysis):
    """A test-only analysis: the share of samples whose top-1 token flips, per layer."""

    name = "test_flip_rate"
    config_keys = ("threshold",)
    result_columns = ["question_id", "layer", "flipped", "model", "task"]
    value_columns = ("flipped",)
    minimum_of = "flipped"

    def plan(self, groups, sample):
        return SamplePlan()

    def rows(self, sample, clean, token_id, plan, outputs, engines):
        return []

    def curve_table(self, results):
        return curve_stats(results, "flipped").assign(value="flipped", label="flip rate")

    @property
    def labels(self):
        return Labels(variant=f"t={self.config['threshold']}", legend="flip rate", tags=("m", "t", self.name))

    @classmethod
    def report_sections(cls, cells):
        from mmflow.analyses.plots import new_figure

        figure, ax = new_figure()
        for cell in cells:
            curve = cell.analysis.curve_table(cell.results)
            ax.plot(curve["layer"], curve["mean"])
        return [("Flip rate", [FigureSpec("flip_rate", "flip rate", figure)])]


def test_a_new_analysis_plugs_into_report_and_wandb_tables(tmp_path):
    from mmflow.report import build_report
    from mmflow.wandb_logger import per_layer_table

    config = {
        "analysis": "test_flip_rate",
        "threshold": 0.5,
        "model": {"name": "m", "n_layers": 4},
        "task": "t",
    }
    results = pd.DataFrame(
        [{"question_id": f"q{s}", "layer": i, "flipped": float(i == s)} for s in range(4) for i in range(4)]
    )
    cell_dir = tmp_path / cell_id(config)
    atomic_write_parquet(cell_dir / "results.parquet", results)
    atomic_write_json(cell_dir / "cell.json", {"cell_id": cell_dir.name, "status": "done", "config": config})
    html = build_report(tmp_path).read_text()
    assert "Flip rate" in html and "figures/flip_rate.png" in html
    assert '<td>m</td><td>t</td><td>flip rate</td><td class="num">—</td>' in html.replace("\n", "")
    assert '<td class="num">0.25</td><td class="num">0</td>' in html.replace("\n", "")  # min and its layer
    table = per_layer_table(analysis_for(config), results, 4)
    np.testing.assert_allclose(table["rel_depth"], [0.0, 0.25, 0.5, 0.75])
    np.testing.assert_allclose(table["mean"], 0.25)
