"""Tests of W&B logging, read back from what offline runs recorded (`wandb leet inspect --json`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import cell_config
from omegaconf import OmegaConf

from mmflow import wandb_logger
from mmflow.analyses.curves import t_quantile
from mmflow.storage.store import atomic_write_json, atomic_write_parquet, cell_id
from mmflow.wandb_logger import WandbCellLogger, cell_logger, log_sweep, logger_config, resolve_mode

pytestmark = pytest.mark.slow  # runs sweeps, trains or builds for real: `make test`, not `make test-fast`

REPO = Path(__file__).resolve().parents[1]
WANDB = str(Path(sys.executable).parent / "wandb")
FAKE_KEY = "fake0key0" + "9f3c1a" * 5  # never a real key; must appear in no file
KNOCKOUTS = {"image_to_question": ("image", "question"), "question_to_last": ("question", "last")}


def inspect(run_dir: Path) -> tuple[list[dict], dict]:
    """An offline run's records (one JSON object each) and its summary object."""
    command = [WANDB, "leet", "inspect", "--json", str(run_dir)]
    lines = subprocess.run(command, capture_output=True, text=True, check=True, timeout=120).stdout
    summary = subprocess.run([*command, "--summary"], capture_output=True, text=True, check=True, timeout=120)
    return [json.loads(line) for line in lines.splitlines() if line.strip()], json.loads(summary.stdout)


def of_type(records: list[dict], kind: str) -> list[dict]:
    return [r[kind] for r in records if r["type"] == kind]


def run_dirs(root: Path, run_id: str) -> list[Path]:
    return sorted((root / "wandb").glob(f"offline-run-*-{run_id}"))


def logger_section(root: Path, **extra) -> dict:
    return {"name": "wandb", "project": "mmflow-test", "mode": "offline", "dir": str(root), **extra}


@pytest.fixture(scope="module")
def computed(tmp_path_factory):
    """Two knockout cells of the tiny LLaVA computed together, each logged to its own offline run."""
    from mmflow.execution.runtime import run_cells
    from mmflow.models.registry import get_model

    tmp = tmp_path_factory.mktemp("wandb")
    model = OmegaConf.to_container(OmegaConf.load(REPO / "conf/model/tiny-llava.yaml"))
    base = cell_config(tmp / "results", sweep_name="wbtest", logger=logger_section(tmp / "wb", curve_every=1))
    configs = [dict(base, knockout={"name": k, "source": s, "target": t}) for k, (s, t) in KNOCKOUTS.items()]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WANDB_API_KEY", FAKE_KEY)
        patch.delenv("WANDB_MODE", raising=False)
        loaded = get_model(model)
        outcomes = run_cells(loaded, configs, logger_factory=cell_logger)
    assert [o.status for o in outcomes] == ["done", "done"]
    return {"tmp": tmp, "root": tmp / "wb", "configs": configs, "outcomes": outcomes, "loaded": loaded}


@pytest.mark.parametrize(
    ("mode", "env", "expected"),
    [
        ("auto", {}, "offline"),
        ("auto", {"WANDB_API_KEY": "k"}, "online"),
        ("auto", {"WANDB_API_KEY": "k", "WANDB_MODE": "offline"}, "offline"),
        ("online", {}, "offline"),
        ("online", {"WANDB_API_KEY": "k"}, "online"),
        ("offline", {"WANDB_API_KEY": "k"}, "offline"),
        ("disabled", {"WANDB_API_KEY": "k"}, "disabled"),
        ("auto", {"WANDB_API_KEY": "k", "WANDB_MODE": "disabled"}, "disabled"),
    ],
)
def test_resolve_mode(mode: str, env: dict, expected: str) -> None:
    assert resolve_mode(mode, env) == expected


def test_logger_config(monkeypatch) -> None:
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert logger_config(None) is None
    assert logger_config({"name": "none"}) is None
    assert logger_config({"name": "wandb", "mode": "disabled"}) is None
    assert logger_config(OmegaConf.create({"name": "wandb", "dir": None}))["project"] == "mmflow"
    with pytest.raises(ValueError, match="logger.mode"):
        logger_config({"name": "wandb", "mode": "sometimes"})
    assert cell_logger({"logger": {"name": "none"}, "results_dir": "/nonexistent"}, 8) is None


def test_each_cell_has_its_own_run_with_its_own_numbers(computed: dict) -> None:
    n_layers = computed["loaded"].n_layers
    curves = []
    for config, outcome in zip(computed["configs"], computed["outcomes"], strict=True):
        (run_dir,) = run_dirs(computed["root"], outcome.cell_id)
        records, summary = inspect(run_dir)
        (run,) = of_type(records, "run")
        assert run["run_id"] == outcome.cell_id == cell_id(config)
        assert run["run_group"] == "wbtest" and run["job_type"] == config["knockout"]["name"]
        tags = ["tiny-llava", "ChooseAttr", "window=3", "random-weights"]  # tiny models: random weights
        assert run["tags"] == tags and run["resume"] is True
        assert summary["config"]["model"]["name"] == "tiny-llava" and summary["config"]["window"] == 3
        assert summary["state"] == "finished" and summary["exit_code"] == 0

        results = pd.read_parquet(Path(outcome.path) / "results.parquet")
        stats = results.groupby("layer")["rel_change_pct"].agg(["mean", "std", "count"])
        half = t_quantile(stats["count"]) * stats["std"] / np.sqrt(stats["count"])
        history = [h["item"] for h in of_type(records, "history")]
        rows = [h for h in history if "curve/rel_change_pct" in h]
        assert [h["layer"] for h in rows] == list(range(n_layers))
        np.testing.assert_allclose([h["curve/rel_change_pct"] for h in rows], stats["mean"])
        np.testing.assert_allclose([h["depth/rel_change_pct"] for h in rows], stats["mean"])
        np.testing.assert_allclose([h["rel_depth"] for h in rows], np.arange(n_layers) / n_layers)
        np.testing.assert_allclose([h["curve/rel_change_pct_ci95_low"] for h in rows], stats["mean"] - half)
        np.testing.assert_allclose([h["depth/rel_change_pct_ci95_high"] for h in rows], stats["mean"] + half)
        curves.append(stats["mean"].to_numpy())

        progress = [h for h in history if "progress/samples_done" in h]
        assert [h["progress/samples_done"] for h in progress] == [1, 2]
        assert [h["progress/scored"] for h in progress] == [1, 2]
        first = results[results["question_id"] == results["question_id"].iloc[0]]
        assert progress[0]["running_curve/rel_change_pct/layer_00"] == pytest.approx(
            first["rel_change_pct"].iloc[0]
        )
        assert progress[1]["progress/running_min_rel_change_pct"] == pytest.approx(stats["mean"].min())
        assert progress[1]["progress/running_curve_table._type"] == "table-file"  # curve_every=1: a chart
        assert progress[1]["progress/running_curve_table.nrows"] == n_layers

        values = summary["summary"]
        assert values["min_rel_change_pct"] == pytest.approx(stats["mean"].min())
        assert values["min_layer"] == int(stats["mean"].idxmin()) == outcome.summary["min_layer"]
        assert (
            values["counts/samples"] == 2 and values["counts/scored"] == 2 and values["n_layers"] == n_layers
        )
        assert values["per_layer"]["_type"] == "table-file" and values["per_layer"]["nrows"] == n_layers
        assert values["figure"]["_type"] == "image-file"
        assert (run_dir / "files" / values["figure"]["path"]).stat().st_size > 20_000
    assert not np.allclose(curves[0], curves[1])  # two cells, two curves: nothing shared between runs


def test_cached_cells_log_nothing(computed: dict) -> None:
    from mmflow.execution.runtime import run_cells

    before = sorted((computed["root"] / "wandb").glob("offline-run-*"))
    outcomes = run_cells(computed["loaded"], computed["configs"], logger_factory=cell_logger)
    assert [o.status for o in outcomes] == ["cached", "cached"]
    assert sorted((computed["root"] / "wandb").glob("offline-run-*")) == before


def test_api_key_never_written(computed: dict) -> None:
    offenders = [
        path
        for path in computed["tmp"].rglob("*")
        if path.is_file() and FAKE_KEY.encode() in path.read_bytes()
    ]
    assert offenders == []


def fabricated_cell(root: Path, n_layers: int, values: np.ndarray) -> Path:
    """A done 'big' cell of known numbers (relative change per sample and layer)."""
    config = {
        "analysis": "knockout",
        "model": {"name": "big", "n_layers": n_layers},
        "task": "ChooseAttr",
        "knockout": {"name": "image_to_question", "source": "image", "target": "question"},
        "window": 5,
        "results_dir": str(root),
        "sweep_name": "wbtest",
    }
    rows = [
        {"question_id": f"q{s}", "layer": layer, "rel_change_pct": float(values[s, layer])}
        for s in range(values.shape[0])
        for layer in range(n_layers)
    ]
    cell_dir = root / cell_id(config)
    atomic_write_parquet(cell_dir / "results.parquet", pd.DataFrame(rows))
    atomic_write_json(
        cell_dir / "cell.json", {"cell_id": cell_id(config), "status": "done", "config": config}
    )
    return cell_dir


def test_sweep_run_compares_models_on_relative_depth(computed: dict, capsys) -> None:
    values = np.arange(24, dtype=float).reshape(2, 12) - 30.0
    big = fabricated_cell(computed["tmp"] / "results", 12, values)
    cell_dirs = [Path(o.path) for o in computed["outcomes"]] + [big]
    sweep_dir = computed["tmp"] / "sweep"
    run_dir = log_sweep(sweep_dir, cell_dirs, {**logger_section(computed["tmp"] / "wb-sweep"), "dir": None})
    assert run_dir.parent == computed["tmp"] / "results" / "wandb"  # default: next to the cells
    assert "wandb sync" in capsys.readouterr().out
    records, summary = inspect(run_dir)
    (run,) = of_type(records, "run")
    assert run["run_id"].startswith("sweep-") and run["job_type"] == "sweep" and run["run_group"] == "wbtest"
    assert summary["config"]["n_cells"] == 3 and summary["config"]["models"] == ["big", "tiny-llava"]
    logged = {k.split(".")[0] for h in of_type(records, "history") for k in h["item"]}
    for knockout in KNOCKOUTS:
        assert f"compare/ChooseAttr/{knockout}_table" in logged
        assert f"compare_figure/ChooseAttr/{knockout}" in logged
    assert summary["summary"]["min_rel_change_pct/ChooseAttr/image_to_question/big/k5"] == pytest.approx(
        -24.0
    )
    table = json.loads((run_dir / "files" / summary["summary"]["curves"]["path"]).read_text())
    curves = pd.DataFrame(table["data"], columns=table["columns"])
    mine = curves[curves["model"] == "big"]
    np.testing.assert_allclose(mine["rel_depth"], np.arange(12) / 12)
    np.testing.assert_allclose(mine["mean"], values.mean(axis=0))
    assert set(curves["model"]) == {"big", "tiny-llava"} and len(curves) == 12 + 2 * 8


def test_resumed_cell_reuses_its_id_and_counts(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("WANDB_MODE", raising=False)
    config = {
        "analysis": "knockout",
        "model": {"name": "m", "n_layers": 4},
        "task": "ChooseAttr",
        "knockout": {"name": "image_to_question", "source": "image", "target": "question"},
        "window": 1,
        "n_samples": 3,
        "results_dir": str(tmp_path),
        "logger": logger_section(tmp_path, curve_every=0),
    }
    first = cell_logger(config, 4)
    first.close()  # interrupted before any sample
    time.sleep(1.05 - time.time() % 1)  # offline run folders are named by the second they start in
    parts = tmp_path / cell_id(config) / "parts"
    atomic_write_parquet(parts / "samples-a.parquet", pd.DataFrame([{"status": "scored", "correct": True}]))
    rows = [{"layer": layer, "rel_change_pct": -10.0 * layer} for layer in range(4)]
    atomic_write_parquet(parts / "results-a.parquet", pd.DataFrame(rows))
    second = cell_logger(config, 4)
    second.sample(
        {"status": "scored", "correct": False}, [{"layer": n, "rel_change_pct": 0.0} for n in range(4)]
    )
    second.close()
    dirs = run_dirs(tmp_path, cell_id(config))
    # one run per cell id to upload (issue 15): the interrupted fragment is set aside, never a new id
    assert len(dirs) == 1
    assert [p.name for p in (tmp_path / "wandb-superseded").iterdir()][0].endswith(cell_id(config))
    records, summary = inspect(dirs[0])
    assert of_type(records, "run")[0]["run_id"] == cell_id(config) and summary["exit_code"] == 1
    (progress,) = [h["item"] for h in of_type(records, "history")]
    assert progress["progress/samples_done"] == 2 and progress["progress/correct"] == 1
    assert progress["running_curve/rel_change_pct/layer_03"] == pytest.approx(-15.0)


def test_a_broken_wandb_never_fails_the_cell(monkeypatch, tmp_path: Path) -> None:
    def broken(*args, **kwargs):
        raise RuntimeError("no wandb-core")

    monkeypatch.setattr(wandb_logger.cell_run, "init_run", broken)
    knockout = {"name": "image_to_question", "source": "image", "target": "question"}
    config = {"results_dir": str(tmp_path), "model": {"name": "m"}, "task": "t"}
    config.update(knockout=knockout, window=1)
    logger = WandbCellLogger(config, 4, {})
    logger.sample({"status": "scored"}, [{"layer": 0, "rel_change_pct": 1.0}])
    logger.finish(pd.DataFrame(), pd.DataFrame(), {})
    logger.close()
    assert logger.run is None and logger.finished


def test_single_run_logs_offline_and_prints_sync(tmp_path: Path) -> None:
    """`launch.py` with a (fake) key in the environment: offline run, sync hint, key in no file."""
    env = {**os.environ, "WANDB_API_KEY": FAKE_KEY, "MMFLOW_RESULTS": str(tmp_path / "results")}
    env.pop("WANDB_MODE", None)
    command = [sys.executable, "launch.py", "n_samples=1", "max_new_tokens=1", "logger.mode=offline"]
    command.append(f"data.cache_dir={tmp_path / 'shapes'}")
    out = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"wandb sync {tmp_path / 'results' / 'wandb'}" in out.stdout
    (cell_json,) = (tmp_path / "results").glob("*/cell.json")
    meta = json.loads(cell_json.read_text())
    (run_dir,) = run_dirs(tmp_path / "results", meta["cell_id"])
    assert inspect(run_dir)[1]["summary"]["counts/samples"] == 1
    assert list((tmp_path / "results" / "_hydra").rglob("config.yaml"))  # the config dump is checked too
    leaks = [p for p in tmp_path.rglob("*") if p.is_file() and FAKE_KEY.encode() in p.read_bytes()]
    assert leaks == [] and FAKE_KEY not in out.stdout + out.stderr
