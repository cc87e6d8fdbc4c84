"""Tests of the local report: plotted values, figure files, index.html, from parquet + cell.json alone."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import cell_config
from omegaconf import OmegaConf

from mmflow.knockout.spec import NAMED_KNOCKOUTS, KnockoutSpec
from mmflow.report import build_report
from mmflow.report.figures import curve_stats, plot_cross_model, plot_model_overview, plot_model_task
from mmflow.storage.cell_data import find_cell_dirs, load_cells
from mmflow.storage.store import atomic_write_json, atomic_write_parquet, cell_id

REPO = Path(__file__).resolve().parents[1]
TASK = "ChooseAttr"


def fabricate_cell(
    root: Path,
    model: str,
    values: np.ndarray,
    knockout: str = "image_to_question",
    status: str = "done",
    analysis: str = "knockout",
    correct: int = 1,
    task: str = TASK,
) -> Path:
    """A cell folder with known numbers: `values[sample, layer]` is the relative change (%)."""
    n_samples, n_layers = values.shape
    source, target = NAMED_KNOCKOUTS[knockout]
    config = {
        "analysis": analysis,
        "model": {"name": model, "n_layers": n_layers},
        "task": task,
        "knockout": {"name": knockout, "source": source, "target": target},
        "window": 3,
        "n_samples": n_samples,
        "results_dir": str(root),
    }
    cell_dir = root / cell_id(config)
    results = pd.DataFrame(
        [
            {"question_id": f"q{s}", "layer": layer, "rel_change_pct": float(values[s, layer])}
            for s in range(n_samples)
            for layer in range(n_layers)
        ]
    )
    samples = pd.DataFrame(
        {
            "question_id": [f"q{s}" for s in range(n_samples)],
            "status": "scored",
            "correct": [s < correct for s in range(n_samples)],
        }
    )
    atomic_write_parquet(cell_dir / "results.parquet", results)
    atomic_write_parquet(cell_dir / "samples.parquet", samples)
    atomic_write_json(
        cell_dir / "cell.json", {"cell_id": cell_id(config), "status": status, "config": config}
    )
    return cell_dir


def curve_values(n_samples: int, n_layers: int, shift: float) -> np.ndarray:
    rng = np.random.default_rng(n_layers + int(shift * 10))
    return rng.normal(size=(n_samples, n_layers)) * 5.0 - shift * np.sin(
        np.arange(n_layers) / n_layers * np.pi
    )


@pytest.fixture()
def fabricated(tmp_path: Path) -> dict[str, Path]:
    """Two models (8 and 12 layers) x two knockouts, plus a failed and a running cell."""
    root = tmp_path / "sweep"
    cells = {}
    for model, n_layers in (("m8", 8), ("m12", 12)):
        for shift, knockout in ((30.0, "image_to_question"), (10.0, "question_to_last")):
            cells[(model, knockout)] = fabricate_cell(root, model, curve_values(4, n_layers, shift), knockout)
    cells["failed"] = fabricate_cell(root, "m8", curve_values(2, 8, 1.0), "last_to_last", status="failed")
    cells["running"] = fabricate_cell(
        root / "nested", "m8", curve_values(2, 8, 1.0), "image_to_last", "running"
    )
    return cells


def data_lines(ax) -> list:
    return [line for line in ax.get_lines() if not line.get_label().startswith("_")]


def band_limits(collection, xs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The lower and upper edge of a fill_between band at each x."""
    vertices = np.concatenate([p.vertices for p in collection.get_paths()])
    low = np.array([vertices[np.isclose(vertices[:, 0], x), 1].min() for x in xs])
    high = np.array([vertices[np.isclose(vertices[:, 0], x), 1].max() for x in xs])
    return low, high


def test_curve_stats_is_mean_and_t_sem() -> None:
    values = np.array([[1.0, -10.0, 4.0], [3.0, -20.0, 4.0], [8.0, -60.0, 4.0]])
    results = pd.DataFrame(
        [{"layer": layer, "rel_change_pct": values[s, layer]} for s in range(3) for layer in range(3)]
    )
    stats = curve_stats(results)
    sem = values.std(axis=0, ddof=1) / np.sqrt(3)
    np.testing.assert_allclose(stats["mean"], values.mean(axis=0))
    t = 4.302652729749462  # Student's t, 0.975 quantile, 2 degrees of freedom
    np.testing.assert_allclose(stats["ci_low"], values.mean(axis=0) - t * sem)
    np.testing.assert_allclose(stats["ci_high"], values.mean(axis=0) + t * sem)
    assert stats["n"].tolist() == [3, 3, 3]
    assert stats.loc[2, "ci_low"] == stats.loc[2, "ci_high"] == 4.0  # no spread, no band


def test_model_task_figure_plots_the_numbers(fabricated: dict) -> None:
    cells, _ = load_cells([fabricated[("m12", k)] for k in ("question_to_last", "image_to_question")])
    ax = plot_model_task(cells).axes[0]
    assert ax.get_xlim() == (0.0, 11.0)  # the model's depth, not a fixed 32
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["Image ↛ Question", "Question ↛ Last"]
    assert "m12" in ax.get_title() and TASK in ax.get_title()
    assert "(%)" in ax.get_ylabel() and "layer" in ax.get_xlabel().lower()
    for cell, line, band in zip(cells, data_lines(ax), ax.collections, strict=True):
        stats = curve_stats(cell.results)
        np.testing.assert_array_equal(line.get_xdata(), np.arange(12))
        np.testing.assert_allclose(line.get_ydata(), stats["mean"])
        low, high = band_limits(band, np.arange(12))
        np.testing.assert_allclose(low, stats["ci_low"])
        np.testing.assert_allclose(high, stats["ci_high"])


def test_cross_model_figure_uses_relative_depth(fabricated: dict) -> None:
    cells, _ = load_cells([fabricated[(m, "question_to_last")] for m in ("m8", "m12")])
    ax = plot_cross_model(cells).axes[0]
    assert ax.get_xlim() == (0.0, 1.0)
    assert "Question ↛ Last" in ax.get_title()
    lines = {line.get_label(): line for line in data_lines(ax)}
    assert set(lines) == {"m12 (L = 12)", "m8 (L = 8)"}
    for cell in cells:
        line = lines[f"{cell.model} (L = {cell.n_layers})"]
        np.testing.assert_allclose(line.get_xdata(), np.arange(cell.n_layers) / cell.n_layers)
        np.testing.assert_allclose(line.get_ydata(), curve_stats(cell.results)["mean"])


def test_model_overview_has_a_panel_per_task(tmp_path: Path) -> None:
    """Every task of a model in one figure: a panel per task, each with that task's curves."""
    dirs = {
        (task, knockout): fabricate_cell(tmp_path, "m6", curve_values(3, 6, shift), knockout, task=task)
        for task, shift in (("QueryAttr", 20.0), ("ChooseRel", 5.0))
        for knockout in ("question_to_last", "image_to_question")
    }
    cells, _ = load_cells(dirs.values())
    figure = plot_model_overview(cells)
    visible = [ax for ax in figure.axes if ax.get_visible()]
    assert [ax.get_title().split(" (")[0] for ax in visible] == ["ChooseRel", "QueryAttr"]
    assert len(figure.axes) == 3 and not figure.axes[2].get_visible()
    assert [t.get_text() for t in figure.legends[0].get_texts()] == ["Image ↛ Question", "Question ↛ Last"]
    for ax, task in zip(visible, ("ChooseRel", "QueryAttr"), strict=True):
        assert ax.get_xlim() == (0.0, 5.0)
        for line, knockout in zip(data_lines(ax), ("image_to_question", "question_to_last"), strict=True):
            (cell,) = [c for c in cells if c.task == task and c.variant == knockout]
            np.testing.assert_allclose(line.get_ydata(), curve_stats(cell.results)["mean"])


def table_rows(index_html: str) -> dict[str, list[str]]:
    """Cells table of index.html: cell id -> the row's cell texts."""
    rows = {}
    for row in re.findall(r"<tr>(.*?)</tr>", index_html, re.S):
        texts = [re.sub(r"<[^>]+>", "", c) for c in re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)]
        if texts:
            rows[texts[-1]] = texts
    return rows


def assert_figure_files(report: Path, index_html: str) -> list[Path]:
    images = [report / src for src in re.findall(r'<img src="([^"]+)"', index_html)]
    for png in images:
        data = png.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000, png
        pdf = png.with_suffix(".pdf").read_bytes()
        assert pdf[:5] == b"%PDF-" and len(pdf) > 5_000, png
    return images


@pytest.mark.slow
def test_report_lists_every_done_cell_with_its_numbers(fabricated: dict) -> None:
    root = fabricated[("m8", "image_to_question")].parent
    unknown = fabricate_cell(root, "m8", curve_values(2, 9, 0.0), analysis="no_such_analysis")
    index = build_report(root)
    html = index.read_text()
    rows = table_rows(html)
    assert index == root / "report" / "index.html"
    assert set(rows) == {p.name for k, p in fabricated.items() if isinstance(k, tuple)}
    for (model, knockout), cell_dir in ((k, v) for k, v in fabricated.items() if isinstance(k, tuple)):
        results = pd.read_parquet(cell_dir / "results.parquet")
        curve = results.groupby("layer")["rel_change_pct"].mean()
        label = KnockoutSpec(knockout, *NAMED_KNOCKOUTS[knockout]).label
        expected = [model, TASK, label, "3", "1/4", "4", f"{curve.min():.4g}", str(curve.idxmin())]
        assert rows[cell_dir.name][:-2] == expected
        assert rows[cell_dir.name][-2] == "—"  # noise floor: none recorded by these fabricated cells
    assert "<h2>Failed cells (1)</h2>" in html  # listed with its error, not as a note
    assert f"<li><code>{fabricated['failed'].name}</code> m8/{TASK}: ?</li>" in html
    assert "command: <code>" in html and "mmflow: <code>" in html and "commit: <code>" in html
    assert f"{fabricated['running']} (status running)" in html
    assert f"{unknown} (status done, analysis &#x27;no_such_analysis&#x27; unknown)" in html
    images = assert_figure_files(index.parent, html)
    names = sorted(p.stem for p in images)
    assert names == [
        "cross__ChooseAttr__image_to_question",
        "cross__ChooseAttr__question_to_last",
        "m12__ChooseAttr__k3",
        "m8__ChooseAttr__k3",
    ]


def tracking_cell(root: Path, p_lower: np.ndarray) -> Path:
    """An answer-tracking cell folder with known lower-case answer probabilities `p_lower[sample, layer]`."""
    n_samples, n_layers = p_lower.shape
    config = {
        "analysis": "answer_tracking",
        "lens": "norm",
        "model": {"name": "m8", "n_layers": n_layers - 1},
    }
    config.update(task=TASK, n_samples=n_samples, results_dir=str(root))
    rows = [
        {"question_id": f"q{s}", "layer": layer, "p_lower": p_lower[s, layer], "p_capital": 0.01}
        for s in range(n_samples)
        for layer in range(n_layers)
    ]
    cell_dir = root / cell_id(config)
    atomic_write_parquet(cell_dir / "results.parquet", pd.DataFrame(rows))
    atomic_write_json(cell_dir / "cell.json", {"cell_id": cell_dir.name, "status": "done", "config": config})
    return cell_dir


@pytest.mark.slow
def test_report_draws_answer_tracking_through_its_analysis(fabricated: dict) -> None:
    root = fabricated[("m8", "image_to_question")].parent
    p_lower = np.array([[0.1, 0.5, 0.9], [0.3, 0.7, 0.5]])
    tracking = tracking_cell(root, p_lower)
    html = build_report(root, out_dir=root / "elsewhere").read_text()
    row = table_rows(html)[tracking.name]
    assert row[:3] == ["m8", TASK, "answer tracking (lens = norm)"] and row[6:8] == ["—", "—"]
    stems = [p.stem for p in assert_figure_files(root / "elsewhere", html)]
    assert f"answer_tracking__m8__ChooseAttr__{tracking.name}" in stems
    assert "Answer tracking (logit lens)" in html
    cell = next(c for c in load_cells([tracking])[0])
    curve = cell.analysis.curve_table(cell.results)
    lower = curve[curve["value"] == "p_lower_pct"]
    np.testing.assert_allclose(lower["mean"], p_lower.mean(axis=0) * 100.0)
    sem = p_lower.std(axis=0, ddof=1) / np.sqrt(2) * 100.0
    t = 12.706204736174698  # Student's t, 0.975 quantile, 1 degree of freedom
    np.testing.assert_allclose(lower["ci_high"], np.minimum(100.0, p_lower.mean(axis=0) * 100.0 + t * sem))
    assert cell.analysis.headline(cell.results)["lower_first_layer_over_50"] == 1


def test_sweep_folder_reports_the_cells_its_sweep_json_lists(fabricated: dict, tmp_path: Path) -> None:
    mine = [fabricated[("m8", "image_to_question")], fabricated[("m12", "image_to_question")]]
    sweep = tmp_path / "results" / "_hydra" / "sweeps" / "smoke"
    atomic_write_json(sweep / "sweep.json", {"cells": [{"cell_id": p.name, "path": str(p)} for p in mine]})
    assert set(table_rows(build_report(sweep).read_text())) == {p.name for p in mine}
    index = build_report(tmp_path, out_dir=tmp_path / "two", cell_dirs=mine[:1])
    assert set(table_rows(index.read_text())) == {mine[0].name}


@pytest.mark.slow
def test_cli_writes_the_report(fabricated: dict, tmp_path: Path) -> None:
    root = fabricated[("m8", "image_to_question")].parent
    out = subprocess.run(
        [sys.executable, "-m", "mmflow.report", str(root), "--out", str(tmp_path / "r")],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert str(tmp_path / "r" / "index.html") in out.stdout
    assert len(table_rows((tmp_path / "r" / "index.html").read_text())) == 4


@pytest.mark.slow
def test_report_of_really_computed_cells(tmp_path: Path) -> None:
    """Two knockouts of the tiny LLaVA through the runtime, then the report from their folders."""
    from mmflow.execution.runtime import run_cells
    from mmflow.models.registry import get_model

    model = OmegaConf.to_container(OmegaConf.load(REPO / "conf/model/tiny-llava.yaml"))
    loaded = get_model(model)
    base = cell_config(tmp_path / "results", task=TASK, model=model["name"])
    configs = [
        dict(base, knockout={"name": k, "source": s, "target": t}) for k, (s, t) in NAMED_KNOCKOUTS.items()
    ]
    outcomes = run_cells(loaded, configs[:2])
    assert [o.status for o in outcomes] == ["done", "done"]
    index = build_report(tmp_path / "results")
    rows = table_rows(index.read_text())
    for outcome in outcomes:
        meta = json.loads((Path(outcome.path) / "cell.json").read_text())
        row = rows[outcome.cell_id]
        assert row[4] == f"{meta['counts']['correct']}/2" and row[5] == "2"
        assert row[6:8] == [f"{outcome.summary['min_rel_change_pct']:.4g}", str(outcome.summary["min_layer"])]
    cells, _ = load_cells(find_cell_dirs(tmp_path / "results"))
    assert plot_model_task(cells).axes[0].get_xlim() == (0.0, loaded.n_layers - 1.0)
    assert_figure_files(index.parent, index.read_text())


def test_a_second_report_redraws_only_figures_whose_cells_changed(fabricated: dict, monkeypatch) -> None:
    import os

    import mmflow.report.figures as report

    root = fabricated[("m8", "image_to_question")].parent
    drawn: list[str] = []
    real = report.save_figure
    monkeypatch.setattr(
        report, "save_figure", lambda fig, folder, stem: drawn.append(stem) or real(fig, folder, stem)
    )
    build_report(root)
    first = sorted(drawn)
    assert len(first) >= 4
    drawn.clear()
    build_report(root)
    assert drawn == []  # same cells, same files: nothing drawn
    results = fabricated[("m12", "question_to_last")] / "results.parquet"
    stat = results.stat()
    os.utime(results, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # the cell was recomputed
    build_report(root)
    assert drawn and set(drawn) < set(first)
    assert all("m12" in stem or "cross" in stem for stem in drawn)


def test_figures_drawn_in_parallel_processes_are_all_there(tmp_path: Path) -> None:
    root = tmp_path / "sweep"
    for model, n_layers in (("m8", 8), ("m12", 12), ("m6", 6)):
        for task in ("ChooseAttr", "ChooseCat", "QueryAttr"):
            for knockout in ("image_to_question", "question_to_last"):
                fabricate_cell(root, model, curve_values(3, n_layers, 10.0), knockout, task=task)
    index = build_report(root, workers=2)
    html = index.read_text()
    images = assert_figure_files(index.parent, html)
    assert len(images) == 18  # 9 per model and task, 6 across models, 3 overviews
    assert "failed" not in html


def test_the_report_header_redacts_secrets_on_the_command_line(monkeypatch) -> None:
    from mmflow.report import provenance

    monkeypatch.setattr("sys.argv", ["launch.py", "-m", "+logger.api_key=s3cr3tKey", "window=3"])
    header = provenance()
    assert header["command"] == "launch.py -m +logger.api_key=<redacted> window=3"
    assert set(header) == {"command", "date", "mmflow", "commit"} and header["date"].endswith("UTC")
