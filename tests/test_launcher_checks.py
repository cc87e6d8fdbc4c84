"""Launcher settings and invalid jobs are refused or listed before anything starts: every
`hydra.launcher` setting is checked when the settings are built (one `ConfigError` line, exit 2),
`mmflow plan` judges cells as `mmflow run` does, and the end summary counts invalid jobs apart."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from mmflow.bench.driver import Driver
from mmflow.errors import ConfigError
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


def test_a_bad_launcher_setting_is_one_line_before_anything_starts(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "mmflow.cli", "run", "-m", "model=tiny-llava", "n_samples=1"]
    command += ["logger=none", f"results_dir={tmp_path}", "hydra.launcher.progress=fancy"]
    proc = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [
        "[mmflow] error: hydra.launcher.progress='fancy': must be one of auto, rich, log, none"
    ]  # no Ray start, no "sweep stopped", no traceback
    assert not list(tmp_path.rglob("sweep.json"))
