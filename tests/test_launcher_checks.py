"""Launcher settings and invalid jobs are refused or listed before anything starts: every
`hydra.launcher` setting is checked when the settings are built (one `ConfigError` line, exit 2),
`mmflow plan` judges cells as `mmflow run` does, and the end summary counts invalid jobs apart."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mmflow.bench.driver import Driver
from mmflow.errors import ConfigError
from mmflow.sweep.core import CellJob, Sweep
from mmflow.sweep.settings import SweepSettings

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def driver(tmp_path: Path):
    d = Driver(tmp_path / "results", tmp_path / "sweeps")
    yield d
    d.close()


def base(tmp_path: Path) -> list[str]:
    return [f"results_dir={tmp_path / 'results'}", "logger=none", "model=tiny-llava"]


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"executor": "lokal"}, "executor='lokal': must be one of ray, local; did you mean 'local'?"),
        (
            {"write_results": "wokers"},
            "write_results='wokers': must be one of auto, driver, workers; did you mean 'workers'?",
        ),
        (
            {"scheduling": "SPRED"},
            "scheduling='SPRED': must be one of SPREAD, DEFAULT; did you mean 'SPREAD'?",
        ),
        ({"scheduling": "spread"}, "did you mean 'SPREAD'?"),  # the case Ray wants, named
        ({"progress": "fancy"}, "progress='fancy': must be one of auto, rich, log, none"),
        ({"replicas": 0}, "replicas=0: must be an integer >= 1"),
        ({"replicas": 1.5}, "replicas=1.5: must be an integer"),
        ({"batch_retries": -3}, "batch_retries=-3: must be an integer >= 0"),
        ({"relay_buffer": 0}, "relay_buffer=0: must be an integer >= 1"),
        ({"poll_s": 0}, "poll_s=0: must be a number > 0"),
        ({"timeout_s": "soon"}, "timeout_s='soon': must be a number"),
        ({"reuse_models": "yes"}, "reuse_models='yes': must be true or false"),
        ({"models": {"m": {"gpu": 1}}}, "models.m.gpu: unknown per-model setting; one of replicas, gpus"),
        ({"models": {"m": {"gpus": -1}}}, "models.m.gpus=-1: must be a number >= 0"),
        ({"models": {"m": 2}}, "models.m=2: must be a mapping"),
        ({"clean_pass_s": {"m": 0}}, "clean_pass_s.m=0: must be a number > 0"),
        ({"group_retries": 1, "batch_retries": 5}, "group_retries=1 and hydra.launcher.batch_retries=5"),
    ],
)
def test_every_launcher_setting_is_checked_when_the_settings_are_built(settings, message) -> None:
    with pytest.raises(ConfigError) as raised:
        SweepSettings.from_dict(settings)
    assert raised.value.code == 2
    assert raised.value.message.startswith("hydra.launcher.") and "\n" not in raised.value.message
    assert message in raised.value.message
    if "must be one of" in message and "did you mean" not in message:  # nothing close: no guess
        assert "did you mean" not in raised.value.message


def test_valid_settings_pass_and_the_models_keys_suggest_their_spelling() -> None:
    ok = SweepSettings.from_dict(
        {"replicas": 2, "models": {"m": {"gpus": 0.5, "replicas": 1}}, "poll_s": 0.1}
    )
    assert (ok.replicas, ok.models["m"]["gpus"]) == (2, 0.5)
    with pytest.raises(ConfigError) as raised:
        SweepSettings(models={"m": {"gpu": 1}})
    assert re.search(r"models\.m\.gpu: .*did you mean 'gpus'\?", raised.value.message)


def test_the_launcher_refuses_a_bad_setting_when_hydra_builds_it(driver) -> None:
    with pytest.raises(ConfigError) as raised:
        driver.launcher(executor="lokal")
    assert re.search(r"hydra\.launcher\.executor='lokal'.*did you mean 'local'", raised.value.message)


def test_per_model_settings_must_name_a_model_of_the_sweep(driver, tmp_path: Path) -> None:
    launcher = driver.launcher("+hydra.launcher.models={tiny-lava:{gpus:1}}", plan="true")
    with pytest.raises(ConfigError) as raised:
        launcher.launch([base(tmp_path)], 0)
    assert raised.value.message == (
        "hydra.launcher.models names 'tiny-lava', which no cell of this sweep uses "
        "(its models: tiny-llava); did you mean 'tiny-llava'?"
    )
    assert not list((tmp_path / "sweeps").rglob("plan.json"))  # refused before the plan
    launcher = driver.launcher("+hydra.launcher.clean_pass_s.toy-llava=3.0", plan="true")
    with pytest.raises(ConfigError) as raised:
        launcher.launch([base(tmp_path)], 0)
    assert re.search(r"clean_pass_s names 'toy-llava'.*\(its models: tiny-llava\)", raised.value.message)
    launcher = driver.launcher("+hydra.launcher.models={tiny-llava:{gpus:1}}", plan="true")
    launcher.launch([base(tmp_path)], 0)  # a model of the sweep: accepted
    assert launcher.plan["new"] == 1


def test_the_plan_judges_cells_as_run_does_and_lists_each_invalid_job(driver, tmp_path: Path, capsys) -> None:
    jobs = [
        [*base(tmp_path), "n_samples=abc"],
        [*base(tmp_path), "window=100"],
        [*base(tmp_path), "analysis=answer_tracking", "lens=rwa"],
        [*base(tmp_path), "analysis=answer_tracking", "window=3"],  # does not compose
        [*base(tmp_path), "window=3"],
    ]
    launcher = driver.launcher(plan="true")
    launcher.launch(jobs, 0)
    plan = launcher.plan
    assert (plan["jobs"], plan["cells"], plan["new"], plan["invalid_jobs"]) == (5, 1, 1, 4)
    (model,) = plan["models"]
    assert (model["cells"], model["batches"]) == (1, 1)  # only the valid cell is planned
    assert [j["job"] for j in plan["invalid"]] == [0, 1, 2, 3]
    assert plan["invalid"][1]["error"] == "CellConfigError: window=100: must be an integer in 1..8"
    assert plan["invalid"][0]["error"].startswith("CellConfigError: n_samples='abc'")
    assert plan["invalid"][2]["error"].startswith("CellConfigError: lens='rwa'")
    assert "Key 'window' is not in struct" in plan["invalid"][3]["error"]
    out = capsys.readouterr().out
    assert "5 jobs -> 1 cells: 1 new, 0 cached, 0 partial, 0 failed before, 4 invalid jobs" in out
    line = f"  invalid job #1 {' '.join(jobs[1])}: CellConfigError: window=100: must be an integer in 1..8"
    assert line in out.splitlines()
    saved = json.loads((Path(launcher.last_sweep.sweep_dir) / "plan.json").read_text())
    assert saved["invalid"] == plan["invalid"]


def test_the_plan_lists_at_most_ten_invalid_jobs_then_how_many_more(driver, tmp_path: Path, capsys) -> None:
    jobs = [[*base(tmp_path), f"window={w}"] for w in range(100, 113)]
    launcher = driver.launcher(plan="true")
    launcher.launch(jobs, 0)
    lines = capsys.readouterr().out.splitlines()
    assert len([line for line in lines if line.startswith("  invalid job #")]) == 10
    assert any(line.startswith("  and 3 more invalid jobs (all in ") for line in lines)
    assert launcher.plan["invalid_jobs"] == 13 and len(launcher.plan["invalid"]) == 13


def test_the_summary_counts_invalid_jobs_apart_from_failed_cells(tmp_path: Path, capsys) -> None:
    from mmflow.sweep.record import print_summary

    cell = {
        "model": {"name": "m1"},
        "task": "ChooseAttr",
        "data": {"name": "shapes", "seed": 0},
        "engine": {"name": "fast", "attention": "sdpa"},
        "require_correct": False,
        "analysis": "knockout",
        "max_new_tokens": 2,
        "n_samples": 4,
        "window": 1,
        "knockout": {"name": "image_to_question", "source": "image", "target": "question"},
        "results_dir": str(tmp_path),
    }
    error = "ConfigAttributeError: Key 'window' is not in struct"
    jobs = [CellJob.resolve(0, ["window=1"], lambda: cell)]
    jobs += [CellJob(i, ["analysis=answer_tracking", f"window={i}"], error=error) for i in (1, 2)]
    sweep = Sweep("t", tmp_path / "sweep", jobs, SweepSettings(report=False))
    sweep.status[jobs[0].cell_id] = "done"
    print_summary(sweep)
    out = [line.rstrip() for line in capsys.readouterr().out.splitlines()]
    (counts,) = [line for line in out if " done, " in line]
    assert counts.startswith("1 done, 0 cached, 0 failed, 2 invalid jobs in ")
    assert out[-3:] == [
        "2 invalid jobs (1 cause):",
        f"INVALID x2: {error}",
        "    first: job #1 analysis=answer_tracking window=1",
    ]
    sweep.status[jobs[0].cell_id] = "failed"
    sweep.errors[jobs[0].cell_id] = "RuntimeError: boom"
    print_summary(sweep)
    out = capsys.readouterr().out
    assert "0 done, 0 cached, 1 failed, 2 invalid jobs in " in out
    assert "1 failed, 2 invalid jobs (2 causes):" in out and "FAILED x1: RuntimeError: boom" in out


def test_a_bad_launcher_setting_is_one_line_before_anything_starts(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "mmflow.cli", "run", "-m", "model=tiny-llava", "n_samples=1"]
    command += ["logger=none", f"results_dir={tmp_path}", "hydra.launcher.progress=fancy"]
    proc = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [
        "[mmflow] error: hydra.launcher.progress='fancy': must be one of auto, rich, log, none"
    ]  # no Ray start, no "sweep stopped", no traceback
    assert not list(tmp_path.rglob("sweep.json"))
