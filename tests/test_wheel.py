"""The built wheel on its own: installed into a fresh virtual environment, run from outside the repo.

No downloads: the fresh environment sees this project's dependencies through a `.pth` file that
points at the test interpreter's site-packages (it installs none of them), and the wheel goes in
with `pip install --no-deps --no-index`. Then `mmflow run` computes the smoke sweep in a temporary
folder, with the configs (the checkout's `conf/` and `sweeps/`, carried as `mmflow/conf` and
`mmflow/sweeps`), toy weights and launcher plugin the wheel carries, and `mmflow report` writes the
report of that sweep.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # runs sweeps, trains or builds for real: `make test`, not `make test-fast`

ROOT = Path(__file__).resolve().parents[1]
SKIP = shutil.ignore_patterns(
    ".git", ".venv", "results", "outputs", "multirun", "build", "dist", "*.egg-info", "__pycache__", "tests"
)


def sh(*cmd: str | Path, cwd: Path, env: dict | None = None, timeout: int = 300) -> str:
    done = subprocess.run(
        [str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, f"{cmd}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built from a copy of the source tree (the checkout gets no build folders)."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"
    shutil.copytree(ROOT, source, ignore=SKIP)
    sh(
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "-w",
        tmp / "dist",
        source,
        cwd=tmp,
    )
    (path,) = (tmp / "dist").glob("mmflow-*.whl")
    return path


def test_the_wheel_carries_configs_data_weights_plugin_and_command(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in (
        "mmflow/conf/config.yaml",
        "mmflow/conf/model/toy-llava.yaml",
        "mmflow/sweeps/smoke.yaml",
        "mmflow/sweeps/paper.yaml",
        "mmflow/data/gqa_tasks/ChooseAttr.csv",
        "mmflow/toy_weights/toy-llava/model.safetensors",
        "mmflow/sweep/scheduler.py",
        "hydra_plugins/mmflow_launcher/__init__.py",
        "hydra_plugins/mmflow_sweeps/__init__.py",
    ):
        assert needed in names, needed
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "mmflow = mmflow.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
    assert not any(n.startswith(("tests/", "conf/", "sweeps/")) for n in names)


@pytest.mark.slow
def test_wheel_in_a_fresh_venv_runs_the_smoke_sweep_and_the_report(wheel: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    sh(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp_path)
    python = venv / "bin" / "python"
    site = Path(
        sh(python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))", cwd=tmp_path).strip()
    )
    (site / "project-deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    sh(python, "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed", wheel, cwd=tmp_path)

    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MMFLOW_RESULTS")}
    env.update(WANDB_MODE="offline", PATH=f"{venv / 'bin'}:{env.get('PATH', '')}")
    where = sh(
        python,
        "-c",
        "import mmflow.sweep, mmflow.config.dirs as p, hydra_plugins.mmflow_launcher as h; "
        "print(mmflow.sweep.__file__, h.__file__, p.CONF_DIR, p.SWEEPS_DIR)",
        cwd=work,
        env=env,
    )
    assert all(str(venv) in p for p in where.split()), where  # the wheel's code, not the checkout's

    # the smoke sweep on one of its two models (4 cells), in this process: the Ray path has its own tests
    overrides = ["-cn", "smoke", "model=tiny-llava", "n_samples=1", "logger=none", "results_dir=results"]
    out = sh(venv / "bin" / "mmflow", "run", *overrides, "hydra.launcher.executor=local", cwd=work, env=env)
    assert "4 done, 0 cached, 0 failed" in out
    (sweep_json,) = (work / "results" / "_hydra" / "sweeps" / "smoke").glob("*/sweep.json")
    record = json.loads(sweep_json.read_text())
    assert record["status"] == "done" and record["counts"]["done"] == 4
    assert {(c["variant"], c["window"]) for c in record["cells"]} == {
        (k, w) for k in ("image_to_question", "question_to_last") for w in (1, 3)
    }
    for cell in record["cells"]:
        meta = json.loads((Path(cell["path"]) / "cell.json").read_text())
        assert meta["status"] == "done" and meta["counts"]["scored"] == 1 and meta["sweep_name"] == "smoke"

    report = sh(
        venv / "bin" / "mmflow", "report", sweep_json.parent, "--out", work / "report", cwd=work, env=env
    )
    index = (work / "report" / "index.html").read_text()
    assert "[mmflow] report:" in report and all(c["cell_id"] in index for c in record["cells"])
    assert list((work / "report" / "figures").glob("*.png"))
