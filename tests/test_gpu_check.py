"""scripts/gpu_check.sh stays runnable: its --dry-run (tiny widths, any device) and the grid-cost formula."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

from mmflow.bench.gpu_check import GRID_SAMPLES_PER_MODEL, grid_hours

pytestmark = pytest.mark.slow  # runs sweeps, trains or builds for real: `make test`, not `make test-fast`


@pytest.mark.slow
def test_gpu_check_dry_run_prints_one_json_line_per_check(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "MMFLOW_CACHE": str(tmp_path), "OMP_NUM_THREADS": "1"}
    cmd = [str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run", "--samples", "1"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert lines[0]["check"] == "env" and lines[0]["dry_run"] is True
    by_check: dict[str, list[dict]] = {}
    for line in lines:
        by_check.setdefault(line["check"], []).append(line)
    combos = {(m, d) for m in ("llava-1.5-7b", "llama3-llava-next-8b") for d in ("float16", "bfloat16")}
    assert {(x["model"], x["dtype"]) for x in by_check["engine"]} == combos
    assert {(x["model"], x["dtype"]) for x in by_check["pipeline"]} == combos
    for engine in by_check["engine"]:
        assert engine["max_abs_diff_p"] < 5e-2 and engine["speedup"] > 1
    for pipeline in by_check["pipeline"]:
        assert pipeline["scored_cell_samples"] == 6  # six knockout cells x one sample
        assert pipeline["pipeline_over_clean"] > 1 and pipeline["speedup_vs_paper"] > 1
        assert pipeline["stages"]["answer"] > 0
        assert 0 < pipeline["knockout_floor_over_clean"] < 6  # six knockouts, each under a clean pass
        assert pipeline["pipeline_floor_over_clean"] == pytest.approx(
            1 + pipeline["knockout_floor_over_clean"]
        )
    next_lengths = [p["sequence_lengths"][0] for p in by_check["pipeline"] if p["model"].startswith("llama3")]
    assert min(next_lengths) > 1500  # anyres geometry kept at tiny widths
    summary = lines[-1]
    assert summary["check"] == "summary" and summary["ok"] is True and summary["failures"] == 0
    assert summary["grid_cost"] is None and any("grid" in c for c in summary["could_not"])
    if not torch.cuda.is_available():
        assert any("no CUDA" in c for c in summary["could_not"]) and "memory" not in by_check


def test_grid_cost_is_samples_times_per_sample_seconds():
    pipelines = {
        "llava-1.5-7b": {"pipeline_s_per_sample": 0.36, "paper_s_per_sample": 36.0},
        "llama3-llava-next-8b": {"pipeline_s_per_sample": 0.72, "paper_s_per_sample": 90.0},
    }
    grid = grid_hours(pipelines)
    hours = GRID_SAMPLES_PER_MODEL / 3600
    assert grid["mmflow_gpu_hours"] == pytest.approx(hours * (0.36 * (1 + 13 / 7) + 0.72 * 2), abs=0.01)
    assert grid["paper_gpu_hours"] == pytest.approx(hours * (36 * (1 + 13 / 7) + 90 * 2), abs=0.1)
    assert grid_hours({"llava-1.5-7b": pipelines["llava-1.5-7b"]}) is None
