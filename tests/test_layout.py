"""The config layout: `conf/` (groups) and `sweeps/` (named sweeps) at the top, one copy each.

A named sweep is a primary config (`mmflow run -cn NAME`); the retired `experiment=NAME` fails with
one line naming that spelling; a folder of one's own sweeps goes in with Hydra's `--config-dir`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.types import RunMode

from mmflow.cli import retired_spelling, run_hydra
from mmflow.config.dirs import CONF_DIR, SWEEPS_DIR, named_sweeps

ROOT = Path(__file__).resolve().parents[1]
SWEEPS = ["paper", "series", "smoke", "toy", "toy_patching", "windows"]


def test_conf_and_sweeps_are_top_level_folders_and_the_only_copies() -> None:
    assert CONF_DIR == ROOT / "conf" and SWEEPS_DIR == ROOT / "sweeps"
    assert named_sweeps() == SWEEPS
    groups = {p.name for p in CONF_DIR.iterdir() if p.is_dir()}
    assert {"model", "data", "analysis", "knockout", "engine", "logger"} <= groups
    assert len(list((CONF_DIR / "model").glob("*.yaml"))) == 16
    tracked = subprocess.run(["git", "ls-files", "*.yaml"], cwd=ROOT, capture_output=True, text=True)
    if tracked.returncode == 0:  # a source checkout: no YAML config anywhere under the package
        assert not [p for p in tracked.stdout.split() if p.startswith("mmflow/") and "conf" in p]
    assert not (ROOT / "mmflow" / "conf" / "config.yaml").exists()


@pytest.mark.parametrize("name", SWEEPS)
def test_every_named_sweep_composes_as_a_multirun_on_top_of_config(name: str, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # found through the search path, from any folder
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name=name, return_hydra_config=True)
    assert cfg.sweep_name == name and cfg.hydra.mode == RunMode.MULTIRUN
    assert cfg.hydra.launcher._target_ == "hydra_plugins.mmflow_launcher.MmflowLauncher"
    assert cfg.task and cfg.results_dir  # conf/config.yaml underneath
    assert cfg.analysis == ("patching" if name == "toy_patching" else "knockout")


@pytest.mark.parametrize("arg", ["experiment=smoke", "+experiment=paper"])
def test_the_retired_experiment_spelling_fails_with_one_line_naming_the_new_one(
    arg, monkeypatch, capsys
) -> None:
    name = arg.split("=")[1]
    monkeypatch.setattr(sys, "argv", ["mmflow run", arg, "n_samples=1"])
    assert run_hydra() == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"mmflow run -cn {name}" in err
    assert retired_spelling(["model=tiny-llava", "sweep_name=x"]) is None
    assert "`mmflow plan -cn paper`" in str(retired_spelling(["experiment=paper"], "mmflow plan"))


def test_a_folder_of_your_own_sweeps_runs_with_config_dir(tmp_path: Path) -> None:
    mine = tmp_path / "my_sweeps"
    mine.mkdir()
    (mine / "mine.yaml").write_text(
        "defaults:\n  - config\n  - override /model: tiny-llava\n  - _self_\n"
        "sweep_name: mine\nn_samples: 3\nhydra:\n  mode: MULTIRUN\n"
        "  sweeper:\n    params:\n      window: 1,3\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "mmflow.cli", "run", "-cd", str(mine), "-cn", "mine", "--cfg", "all"]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "sweep_name: mine" in done.stdout and "n_samples: 3" in done.stdout
    assert "name: tiny-llava" in done.stdout and "window: 1,3" in done.stdout
