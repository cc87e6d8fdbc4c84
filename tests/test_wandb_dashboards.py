"""The W&B workspace and report of a sweep (issue 26): specs built from offline sweeps (the smoke sweep
and a mixed one), checked against what the offline runs really logged (`wandb leet inspect --json`),
artifacts read back. Publishing: tests/test_wandb_publish.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from wandb_sweeps import run_mixed, run_smoke

from mmflow.wandb_logger.publish import REPORT_FILE, WORKSPACE_FILE, load_report, load_workspace

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> dict:
    return run_smoke(tmp_path_factory)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> dict:
    return run_mixed(tmp_path_factory)


def outline(workspace) -> list[tuple[str, list[str]]]:
    return [
        (s.name, [getattr(p, "title", None) or p.chart_strings["title"] for p in s.panels])
        for s in workspace.sections
    ]


def panels_of(workspace, report) -> list:
    panels = [p for s in workspace.sections for p in s.panels]
    return panels + [p for b in report.blocks for p in (getattr(b, "panels", None) or [])]


@pytest.mark.slow  # the smoke sweep: 8 cells, ~40 s on a shared machine
def test_smoke_workspace_sections_and_panels(smoke: dict) -> None:
    workspace = load_workspace(smoke["sweep_dir"] / WORKSPACE_FILE)  # validated by wandb-workspaces' models
    titles = ["ChooseAttr — window 1", "ChooseAttr — window 3"]
    assert outline(workspace) == [
        ("Knockout: Image ↛ Question", titles),
        ("Knockout: Question ↛ Last", titles),
    ]
    sweep_runs = [r for r in smoke["runs"] if r.startswith("sweep-")]
    assert len(sweep_runs) == 1 and sorted(smoke["ids"]) == sorted(set(smoke["runs"]) - set(sweep_runs))
    assert workspace.runset_settings.filters == f'Metric("ID") in {smoke["ids"] + sweep_runs}'
    for panel in (p for s in workspace.sections for p in s.panels):
        assert panel.x.name == "rel_depth" and len(panel.y) == 2  # one line per model
        one, next_ = "LLaVA-1.5 tiny [random weights]", "LLaVA-NeXT (LLaMA-3) tiny [random weights]"
        assert sorted(panel.line_titles.values()) == [one, next_]  # random weights marked (issue 23)
        colours = {title: panel.line_colors[series]["color"] for series, title in panel.line_titles.items()}
        assert colours == {one: "#1f77b4", next_: "#d62728"}  # by family
    first = workspace.sections[0].panels[0]
    assert [m.name for m in first.y] == [
        "flow/ChooseAttr/image_to_question/tiny-llava/w1/rel_change_pct",
        "flow/ChooseAttr/image_to_question/tiny-llava-next/w1/rel_change_pct",
    ]


@pytest.mark.slow  # the smoke sweep: 8 cells, ~40 s on a shared machine
def test_every_panel_names_a_key_its_runs_logged(smoke: dict, mixed: dict) -> None:
    for sweep in (smoke, mixed):
        workspace = load_workspace(sweep["sweep_dir"] / WORKSPACE_FILE)
        report = load_report(sweep["sweep_dir"] / REPORT_FILE)
        logged = {key for run in sweep["runs"].values() for key in run["keys"]}
        checked = 0
        for panel in panels_of(workspace, report):
            kind = type(panel).__name__
            if kind == "LinePlot":
                for series in panel.line_titles:  # "<run id>:<key>": the run really logged that key
                    run_id, key = series.split(":", 1)
                    assert {key, "rel_depth"} <= sweep["runs"][run_id]["keys"], series
                assert {m.name for m in panel.y} == {s.split(":", 1)[1] for s in panel.line_titles}
            elif kind == "CustomChart":
                assert panel.query["summaryTable"]["tableKey"] in logged
            elif kind == "MediaBrowser":
                assert set(panel.media_keys) <= logged and panel.media_keys
            else:
                raise AssertionError(f"unexpected panel {kind}")
            checked += 1
        assert checked >= 8


@pytest.mark.slow  # the smoke sweep: 8 cells, ~40 s on a shared machine
def test_facet_keys_carry_the_cells_curves(smoke: dict) -> None:
    cell_id = smoke["ids"][0]
    results = pd.read_parquet(smoke["tmp"] / "results" / cell_id / "results.parquet")
    history = [h for h in smoke["runs"][cell_id]["history"] if "rel_depth" in h]
    (key,) = [k for k in history[0] if k.startswith("flow/")]
    assert key == "flow/ChooseAttr/image_to_question/tiny-llava/w1/rel_change_pct"
    means = results.groupby("layer")["rel_change_pct"].mean()
    np.testing.assert_allclose([h[key] for h in history], means.to_numpy())
    np.testing.assert_allclose([h["rel_depth"] for h in history], means.index / 8)


def test_mixed_sweep_has_patching_beside_knockout_tracking_and_head_maps(mixed: dict) -> None:
    workspace = load_workspace(mixed["sweep_dir"] / WORKSPACE_FILE)
    assert outline(workspace) == [
        ("Knockout: Image ↛ Question", ["ChooseAttr — window 3"]),
        (
            "Patching beside knockout",
            ["tiny-llava — ChooseAttr: knockout", "tiny-llava — ChooseAttr: patching (corruption = noise)"],
        ),
        ("Answer tracking (logit lens)", ["tiny-llava — ChooseAttr"]),
        (
            "Head-resolved knockout maps",
            ["tiny-llava — ChooseAttr: Image ↛ Last (per head), relative change (%) per head"],
        ),
    ]
    patching = workspace.sections[1].panels[1]
    assert [m.name for m in patching.y] == [
        "flow/ChooseAttr/patching_noise/tiny-llava/w3/recovered_pct/image",
        "flow/ChooseAttr/patching_noise/tiny-llava/w3/recovered_pct/last",
    ]
    (chart,) = workspace.sections[3].panels
    assert chart.chart_name == "wandb/confusion_matrix/v1"
    assert chart.chart_fields == {"Actual": "layer", "Predicted": "head", "nPredictions": "rel_change_pct"}
    heads_run = next(
        r for r in mixed["runs"].values() if chart.query["summaryTable"]["tableKey"] in r["keys"]
    )
    assert not any(
        k.startswith("flow/") and k.endswith("/w3/rel_change_pct") and "heads=" not in k
        for k in heads_run["keys"]
    )  # the per-head cell never draws into the all-heads panels


def test_report_says_what_was_run_and_shows_the_paper_figures(mixed: dict) -> None:
    report = load_report(mixed["sweep_dir"] / REPORT_FILE)
    text = next(b.text for b in report.blocks if type(b).__name__ == "MarkdownBlock")
    data = json.loads((mixed["tmp"] / "results" / mixed["ids"][0] / "cell.json").read_text())["config"][
        "data"
    ]
    assert "**Command:**" in text and "**mmflow:** 0.1.0" in text and "commit `" in text
    assert (
        "| tiny-llava | tiny:tiny-llava | - | float32 | ChooseAttr | patching (corruption = noise) | shapes |"
        in text
    )
    assert "| fast | none (no paper-code differences) |" in text and data == {**data, "name": "shapes"}
    headings = [b.text for b in report.blocks if type(b).__name__ in ("H2", "H3")]
    assert (
        headings[:2] == ["What was run", "Knockout: Image ↛ Question"]
        and "Figures as in the paper" in headings
    )
    sweep_run = next(
        r for r in mixed["runs"].values() if r["dir"].name.split("-", 3)[-1].startswith("sweep-")
    )
    figures = [k for k in sweep_run["keys"] if k.startswith("paper_figure/")]
    assert len(figures) >= 3


def test_artifacts_name_their_inputs_and_hold_the_cells_files(mixed: dict) -> None:
    for cell_id in mixed["ids"]:
        (artifact,) = [a for a in mixed["runs"][cell_id]["artifacts"] if a["type"] == "cell-results"]
        assert artifact["name"] == f"cell-{cell_id}"
        files = {f["path"]: f for f in artifact["manifest"]["contents"]}
        assert sorted(files) == ["cell.json", "results.parquet", "samples.parquet"]
        staged = pd.read_parquet(files["results.parquet"]["local_path"])
        pd.testing.assert_frame_equal(
            staged, pd.read_parquet(mixed["tmp"] / "results" / cell_id / "results.parquet")
        )
        inputs = json.loads(artifact["metadata"])["inputs"]
        assert inputs["model"] == {
            "artifact": "model-tiny-tiny-llava",
            "checkpoint": "tiny:tiny-llava",
            "revision": None,
            "replica": True,
            "name": "tiny-llava",
            "family": "LLaVA-1.5",
            "dtype": "float32",
        }
        assert inputs["data"]["data"] == {"name": "shapes", "seed": 0}
        assert inputs["data"]["artifact"] == f"data-shapes-{inputs['data']['digest'][:16]}"
    (sweep_id,) = [r for r in mixed["runs"] if r.startswith("sweep-")]
    (figures,) = [a for a in mixed["runs"][sweep_id]["artifacts"] if a["type"] == "figures"]
    assert figures["name"] == f"figures-{sweep_id}"
    assert sorted(json.loads(figures["metadata"])["cells"]) == sorted(f"cell-{c}" for c in mixed["ids"])
    pngs = [f for f in figures["manifest"]["contents"] if f["path"].endswith(".png")]
    assert len(pngs) >= 3 and all(Path(f["local_path"]).read_bytes()[:4] == b"\x89PNG" for f in pngs)


def test_table_data_is_named_by_the_files_digest() -> None:
    from mmflow.wandb_logger.keys import data_input

    config = {"data": {"name": "table", "path": "/x/q.csv", "sha256": "ab" * 32, "format": "csv"}}
    described = data_input(config)
    assert described["artifact"] == "data-table-" + "ab" * 8 and described["digest_of"] == "file"
    assert data_input({"data": {**config["data"], "path": "/elsewhere/q.csv"}})["digest"] == "ab" * 32


def test_missing_wandb_workspaces_is_a_clear_error(monkeypatch) -> None:
    from mmflow.wandb_logger import specs

    def missing(name: str):
        raise ImportError(f"No module named {name!r}")

    monkeypatch.setattr(specs.importlib, "import_module", missing)
    with pytest.raises(RuntimeError, match="pip install 'wandb-workspaces"):
        specs.import_workspaces()


def test_styles_follow_size_and_colours_family() -> None:
    from mmflow.wandb_logger.keys import colours, facet_key, styles

    configs = [
        {"model": {"name": n, "family": f, "size": s}}
        for n, f, s in [("a", "X", "7B"), ("b", "X", "13B"), ("c", "Y", "7B")]
    ]
    assert colours(configs) == {"X": "#1f77b4", "Y": "#d62728"}
    assert styles(configs) == {"13B": "solid", "7B": "dashed"}
    config = {
        "analysis": "knockout",
        "task": "T",
        "window": 3,
        "model": {"name": "llava-1.5-7b"},
        "knockout": {"name": "image_to_last", "source": "image", "target": "last"},
    }
    assert facet_key(config, "rel_change_pct") == "flow/T/image_to_last/llava-1_5-7b/w3/rel_change_pct"
