"""Cells computed before the sweep core moved (main at 13f7c92) keep their ids and are found cached.

`tests/fixtures/legacy_results/` holds 12 cell folders made by that code (8 from the smoke sweep, 4
single runs: toy-llava default cell, answer tracking with both lenses, a custom knockout on the
reference engine); `cells.json` gives the overrides that made each one.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir

from mmflow.cli import cell_config
from mmflow.config.dirs import CONF_DIR
from mmflow.storage.store import cell_id
from mmflow.sweep.core import CellJob, Sweep
from mmflow.sweep.settings import SweepSettings

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "legacy_results"
LEGACY = json.loads((FIXTURE / "cells.json").read_text())


@pytest.fixture
def results(tmp_path: Path) -> Path:
    copy = tmp_path / "results"
    shutil.copytree(FIXTURE, copy)
    return copy


def compose_cell(overrides: list[str], results: Path) -> dict:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[*overrides, f"results_dir={results}", "logger=none"])
    return cell_config(cfg)


def files(results: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in results.rglob("*") if p.is_file()}


def test_legacy_cells_keep_their_ids_and_are_reported_cached(results: Path, tmp_path: Path, capsys) -> None:
    assert len(LEGACY) == 12
    jobs = []
    for idx, (legacy_id, overrides) in enumerate(LEGACY.items()):
        config = compose_cell(overrides, results)
        assert cell_id(config) == legacy_id, overrides
        jobs.append(CellJob.resolve(idx, overrides, lambda c=config: c))
    before = files(results)
    settings = SweepSettings(executor="local", progress="none", report=False)
    sweep = Sweep("legacy", tmp_path / "sweep", jobs, settings, single=True)
    sweep.run()
    assert sweep.status == {legacy_id: "cached" for legacy_id in LEGACY}
    record = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert record["status"] == "done" and record["counts"]["cached"] == 12
    assert files(results) == before  # nothing recomputed or rewritten
    assert "0 done, 12 cached, 0 failed" in capsys.readouterr().out


@pytest.mark.slow
def test_a_single_run_of_a_legacy_cell_prints_its_curve_from_the_cache(results: Path, tmp_path: Path) -> None:
    legacy_id = "4fad01d82b9cc4a8"  # `python launch.py n_samples=2`: toy-llava, Image -> Question, k = 2
    before = files(results)
    env = {**os.environ, "MMFLOW_RESULTS": str(results)}
    command = [sys.executable, str(ROOT / "launch.py"), *LEGACY[legacy_id], "logger=none"]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert f"[mmflow] cell {legacy_id}: cached -> {results / legacy_id}" in out
    assert "0 done, 1 cached, 0 failed" in out
    # the curve table: one row per centre layer of the 6-layer toy, with the stored mean change
    curve = pd.read_parquet(results / legacy_id / "results.parquet").groupby("layer")["rel_change_pct"].mean()
    assert "top-1 flips" in out and "centre layer" in out
    rows = [line for line in out.splitlines() if line.startswith("│") and line.count("│") == 6]
    assert [int(r.split("│")[1]) for r in rows] == list(range(6))
    assert [float(r.split("│")[2]) for r in rows] == pytest.approx(curve.tolist(), rel=1e-2)
    figure = Path(next(x for x in out.splitlines() if x.startswith("figure: ")).removeprefix("figure: "))
    assert figure.is_file() and figure.suffix == ".png"
    (sweep_json,) = (results / "_hydra" / "runs").glob("*/sweep.json")
    record = json.loads(sweep_json.read_text())
    assert record["sweep_name"] == "single" and record["cells"][0]["status"] == "cached"
    assert files(results).keys() >= before.keys()
    assert {p: t for p, t in files(results).items() if p in before} == before
