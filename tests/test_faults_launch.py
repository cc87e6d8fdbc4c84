"""Issue 15 through the public commands: `python launch.py` twice at once, and two `launch.py -m`
sweeps at once over overlapping grids on one results folder (real processes, a real Ray cluster).
"""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

pytestmark = pytest.mark.slow  # runs sweeps, trains or builds for real: `make test`, not `make test-fast`

ROOT = Path(__file__).resolve().parents[1]
N_LAYERS = 8  # tiny-llava
SECRET = "hf_N0tForF1les"


@pytest.fixture(scope="module", autouse=True)
def tiny_model_built() -> None:
    from mmflow.models.synthetic.tiny import ensure_tiny_model

    ensure_tiny_model("tiny-llava")


def start(results: Path, *overrides: str) -> subprocess.Popen:
    flags = [o for o in overrides if o.startswith("-")]  # Hydra wants `-m` before the overrides
    cmd = [
        sys.executable,
        "launch.py",
        *flags,
        "model=tiny-llava",
        "logger=none",
        f"results_dir={results}",
        *(o for o in overrides if not o.startswith("-")),
    ]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        raise AssertionError(f"timed out:\n{out[-3000:]}") from None
    return out


def wait_for(condition, timeout: float, what: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"never saw {what}:\n{finish(proc)[-3000:]}")
        time.sleep(0.2)


def cell_dirs(results: Path) -> list[Path]:
    return sorted(p.parent for p in results.glob("*/cell.json"))


def assert_complete(cell: Path, n_samples: int) -> dict:
    meta = json.loads((cell / "cell.json").read_text())
    samples = pd.read_parquet(cell / "samples.parquet")
    results = pd.read_parquet(cell / "results.parquet")
    assert meta["status"] == "done" and meta["counts"]["samples"] == n_samples
    assert len(samples) == n_samples and samples["question_id"].is_unique
    assert len(results) == n_samples * N_LAYERS and not results.duplicated(["question_id", "layer"]).any()
    return meta


@pytest.mark.slow
def test_one_cell_launched_twice_at_once_is_computed_once(tmp_path):
    """Items 6 and 11: a killed run, then the same command twice at once."""
    results, n = tmp_path / "results", 10
    killed = start(results, f"n_samples={n}")
    parts = lambda: len(list(results.glob("*/parts/samples-*.parquet")))  # noqa: E731
    wait_for(lambda: parts() >= 2, 240, "two finished samples", killed)
    killed.kill()  # SIGKILL: nothing can be recorded; the OS frees the cell's lock
    finish(killed)
    (cell,) = cell_dirs(results)
    assert json.loads((cell / "cell.json").read_text())["status"] == "running"

    first, second = start(results, f"n_samples={n}"), start(results, f"n_samples={n}")
    outs = [finish(first), finish(second)]
    assert [first.returncode, second.returncode] == [0, 0], outs
    ends = sorted(re.search(r"\[mmflow\] cell \w+: (\w+) -> ", o).group(1) for o in outs)
    assert ends == ["cached", "done"], outs  # one computed it, the other found it finished
    assert sum("stale 'running' record" in o for o in outs) == 1
    meta = assert_complete(cell, n)
    assert len(meta["runs"]) == 2 and meta["runs"][0]["ended"].startswith("unrecorded")
    assert meta["runs"][1]["ended"] == "done"
    assert len(list((results / "_hydra" / "runs").iterdir())) == 3  # one folder per launch


@pytest.mark.ray
@pytest.mark.slow
def test_two_sweeps_at_once_on_one_results_folder(ray_cluster, tmp_path):
    """Items 3, 8, 10 and 11: overlapping grids, an invalid cell, a secret, a stale sweep record."""
    results = tmp_path / "results"
    gone = subprocess.Popen(["true"])
    gone.wait()  # a driver that was killed: its pid no longer runs
    stale = results / "_hydra" / "sweeps" / "2020-01-01_00-00-00" / "sweep.json"
    stale.parent.mkdir(parents=True)
    driver = {"host": socket.gethostname(), "pid": gone.pid, "since": "2020-01-01T00:00:00"}
    stale.write_text(json.dumps({"status": "running", "driver": driver, "cells": []}))

    def sweep(*grid: str) -> subprocess.Popen:
        cmd = [
            *(
                "-m",
                f"hydra.launcher.ray.init.address={ray_cluster.address}",
                "n_samples=2",
                "hydra.launcher.progress=log",
            ),
            f"+hydra.launcher.ray.init.runtime_env.env_vars.HF_TOKEN={SECRET}",
            *grid,
        ]
        return start(results, *cmd)

    a = sweep("window=0,3", "task=ChooseAttr,QueryAttr")
    b = sweep("window=3,5", "task=ChooseAttr")
    out_a, out_b = finish(a, 400), finish(b, 400)
    assert b.returncode == 0, out_b[-3000:]
    assert a.returncode != 0  # its two window=0 jobs are invalid

    folders = sorted(p.parent for p in (results / "_hydra" / "sweeps").glob("*/sweep.json"))
    records = {p: json.loads((p / "sweep.json").read_text()) for p in folders}
    assert len(folders) == 3  # the stale one and one per launch, never shared
    assert (
        records[stale.parent]["status"] == "interrupted"
        and "no longer running" in records[stale.parent]["stale"]
    )
    assert "stale sweep record" in out_a + out_b
    (rec_a,) = [r for r in records.values() if len(r.get("cells", [])) == 4]
    failed = [c for c in rec_a["cells"] if c["window"] == 0]
    assert len(failed) == 2 and all(c["status"] == "failed" for c in failed)
    assert all(c["error"].startswith("CellConfigError: window=0") for c in failed)
    assert {c["status"] for c in rec_a["cells"] if c["window"] == 3} <= {"done", "cached"}

    cells = [c for c in cell_dirs(results) if json.loads((c / "cell.json").read_text())["status"] != "failed"]
    assert len(cells) == 3  # (3, ChooseAttr) shared by both grids, (3, QueryAttr), (5, ChooseAttr)
    for cell in cells:
        meta = assert_complete(cell, 2)
        assert len(meta["runs"]) == 1, meta["runs"]  # computed once, by one of the two sweeps

    for path in (p for p in results.rglob("*") if p.is_file()):
        assert SECRET.encode() not in path.read_bytes(), path
    for folder in folders[1:]:
        assert "<redacted>" in (folder / "multirun.yaml").read_text()


@pytest.mark.slow
@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_stopped_run_ends_with_one_line_and_the_signal_exit_code(tmp_path, signum: int, code: int):
    """Ctrl-C or `kill`: the resume hint is the last line, no traceback, exit code 128 + signal."""
    results = tmp_path / "results"
    proc = start(results, "n_samples=40")
    wait_for(lambda: any(results.glob("*/parts/samples-*.parquet")), 240, "a finished sample", proc)
    proc.send_signal(signum)
    out = finish(proc)
    assert proc.returncode == code, out[-3000:]
    assert "Traceback" not in out and "KeyboardInterrupt" not in out, out[-3000:]
    last = out.strip().splitlines()[-1]
    assert "sweep stopped: re-run the same command to resume (finished samples are kept)" in last, out[-3000:]
    (cell,) = cell_dirs(results)
    assert json.loads((cell / "cell.json").read_text())["status"] != "done"
