"""Clusters without a shared disk: real `ray start` nodes on 127.0.0.1, sweeps from a third process.

The worker node runs in its own mount namespace with an empty tmpfs over the results folder, so
whatever it wrote there itself would be lost to the driver: every cell must land through the driver.
Each test stops the nodes it started (by process id) and bounds every wait.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest
from conftest import ray_sweep_cmd
from ray_nodes import ENV, can_unshare, start_head, start_worker

ROOT = Path(__file__).resolve().parents[1]
N_LAYERS = 8
pytestmark = [pytest.mark.ray, pytest.mark.slow]
needs_unshare = pytest.mark.skipif(not can_unshare(), reason="needs `unshare --mount` and tmpfs (root)")
SAME_META = ("cell_id", "status", "config", "rows", "counts", "headline", "engine", "clean_passes_per_sample")


@pytest.fixture(scope="module", autouse=True)
def tiny_model_built() -> None:
    from mmflow.models.synthetic.tiny import ensure_tiny_model

    ensure_tiny_model("tiny-llava")


def sweep_cmd(results: Path, sweep_dir: Path, address: str, *overrides: str) -> list[str]:
    return ray_sweep_cmd(results, sweep_dir, address, "model=tiny-llava", "window=1", *overrides)


class Sweep:
    """A sweep in a subprocess: its output lines with their times, and the driver's memory."""

    def __init__(self, cmd: list[str], env: dict[str, str] = ENV) -> None:
        """`env`: `ray_nodes.ENV` to join `ray start` nodes; the tests' own environment to join the
        loopback `ray_cluster` (Ray's two modes cannot reach each other's addresses)."""
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
        )
        self.lines: list[tuple[float, str]] = []
        self.max_rss = 0
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append((self.now(), line))

    def now(self) -> float:
        return time.monotonic() - self.t0

    def sample_memory(self) -> None:
        try:
            self.max_rss = max(self.max_rss, psutil.Process(self.proc.pid).memory_info().rss)
        except psutil.NoSuchProcess:
            pass

    def wait(self, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while self.proc.poll() is None and time.monotonic() < deadline:
            self.sample_memory()
            time.sleep(0.2)
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)
        self.reader.join(timeout=10)
        return self.output

    @property
    def output(self) -> str:
        return "".join(line for _, line in self.lines)

    def first(self, text: str) -> float | None:
        return next((t for t, line in self.lines if text in line), None)


def read_cells(results: Path) -> dict[str, dict]:
    cells = {}
    for path in results.glob("*/cell.json"):
        try:
            cells[path.parent.name] = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
    return cells


def recorded(cell_dir: Path) -> int:
    return len(list((cell_dir / "parts").glob("samples-*.parquet")))


def assert_complete(cell_dir: Path, n_samples: int) -> None:
    samples = pd.read_parquet(cell_dir / "samples.parquet")
    results = pd.read_parquet(cell_dir / "results.parquet")
    assert len(samples) == n_samples and samples["question_id"].is_unique
    assert (samples["status"] == "scored").all()
    assert len(results) == n_samples * N_LAYERS
    assert not results.duplicated(["question_id", "layer"]).any()
    assert not (cell_dir / "parts").exists()


@pytest.fixture
def nodes():
    """Started nodes, stopped at the end whatever happens."""
    started = []
    yield started
    for node in reversed(started):
        node.stop()


def test_driver_written_cells_equal_worker_written_ones(ray_cluster, tmp_path):
    """The same sweep with `write_results=workers` and `driver`: the same files, byte for byte."""
    grid = ("task=ChooseAttr", "knockout=image_to_question,question_to_last", "n_samples=2")
    folders = {}
    for mode in ("workers", "driver"):
        results = folders[mode] = tmp_path / mode
        cmd = sweep_cmd(results, tmp_path / f"sweep-{mode}", ray_cluster.address, *grid)
        sweep = Sweep([*cmd, f"hydra.launcher.write_results={mode}"], env=dict(os.environ))
        assert sweep.wait(300) and sweep.proc.returncode == 0, sweep.output[-3000:]
        assert ("file write(s)" in sweep.output) == (mode == "driver")
    shared, relayed = read_cells(folders["workers"]), read_cells(folders["driver"])
    assert len(shared) == 2 and set(shared) == set(relayed)
    for cell_id, meta in shared.items():
        for record in (meta, relayed[cell_id]):
            assert Path(record["config"].pop("results_dir")).parent == tmp_path
        for key in SAME_META:
            assert relayed[cell_id].get(key) == meta.get(key), key
        for name in ("samples.parquet", "results.parquet"):
            mine, theirs = folders["driver"] / cell_id / name, folders["workers"] / cell_id / name
            assert mine.read_bytes() == theirs.read_bytes(), name
        assert_complete(folders["driver"] / cell_id, n_samples=2)


@needs_unshare
def test_a_worker_without_the_results_folder_lands_every_cell_in_the_driver_folder(nodes, tmp_path):
    """The head offers no CPU, so every actor runs on the worker, which sees an empty private tmpfs
    where the results folder is. With the default (`write_results=auto` -> driver when joining) all
    cells land complete where the driver is; with `workers` the cell files stay in the worker's
    namespace and never reach the driver (what this setup guards against)."""
    results = tmp_path / "results"
    head, address = start_head(cpus=0)
    nodes.append(head)
    worker = start_worker(address, cpus=2, private=results)
    nodes.append(worker)
    grid = ("task=ChooseAttr,ChooseCat", "knockout=image_to_question,question_to_last", "n_samples=3")
    sweep = Sweep(sweep_cmd(results, tmp_path / "sweep1", address, *grid, "hydra.launcher.replicas=2"))
    actor_pids: set[int] = set()
    deadline = time.monotonic() + 400
    while sweep.proc.poll() is None and time.monotonic() < deadline:
        actor_pids |= worker.pids()
        time.sleep(0.2)
    output = sweep.wait(30)
    assert sweep.proc.returncode == 0, output[-4000:]
    cells = read_cells(results)
    assert len(cells) == 4 and all(c["status"] == "done" for c in cells.values())
    assert {c["pid"] for c in cells.values()} <= actor_pids  # computed on the worker node
    for cell_id in cells:
        assert_complete(results / cell_id, n_samples=3)
    assert "file write(s)" in output

    again = Sweep(sweep_cmd(results, tmp_path / "sweep2", address, *grid))
    assert again.wait(120) and again.proc.returncode == 0
    assert "4 finished before, 0 to compute" in again.output  # resume reads the driver's folder

    lost = results / "lost"
    control = sweep_cmd(
        lost, tmp_path / "sweep3", address, "n_samples=1", "hydra.launcher.write_results=workers"
    )
    assert Sweep(control).wait(300)
    assert not list(lost.glob("*/samples.parquet"))  # written where only the worker could see it


@needs_unshare
def test_killing_a_worker_node_mid_batch_resumes_its_cells_on_the_head(nodes, tmp_path):
    """Head and worker offer one actor each; the worker node (all its processes, SIGKILL) dies once
    a cell on it has some but not all samples at the driver. Its batch is requeued onto the head's
    actor, which resumes each cell from its last finished sample: every cell once, complete."""
    results, n_samples = tmp_path / "results", 12
    head, address = start_head(cpus=1)
    nodes.append(head)
    worker = start_worker(address, cpus=1, private=results)
    nodes.append(worker)
    grid = ("task=ChooseAttr,ChooseCat", "knockout=image_to_question,question_to_last")
    cmd = sweep_cmd(results, tmp_path / "sweep", address, *grid, f"n_samples={n_samples}")
    sweep = Sweep([*cmd, "hydra.launcher.replicas=2"])
    timeline: list[tuple[float, str]] = []
    at_kill: dict[str, int] = {}
    deadline = time.monotonic() + 400
    while sweep.proc.poll() is None and not at_kill and time.monotonic() < deadline:
        sweep.sample_memory()
        on_worker = worker.pids()
        for cell_id, cell in read_cells(results).items():
            n = recorded(results / cell_id) if cell.get("pid") in on_worker else 0
            if cell["status"] == "running" and 0 < n < n_samples:
                at_kill[cell_id] = n
        if at_kill:
            worker.kill()
            timeline.append((sweep.now(), f"worker node killed; cells at the driver: {at_kill}"))
        time.sleep(0.05)
    output = sweep.wait(400)
    assert at_kill, "no cell on the worker node was ever part-way through its samples\n" + output[-3000:]
    assert sweep.proc.returncode == 0, output[-4000:]

    cells = read_cells(results)
    assert len(cells) == 4 and all(c["status"] == "done" for c in cells.values())
    for cell_id in cells:
        assert_complete(results / cell_id, n_samples=n_samples)
    for cell_id, n in at_kill.items():
        assert cells[cell_id]["attempt"] == 2
        pattern = rf"cell {cell_id}: stale 'running' record .* resuming from (\d+) recorded"
        resumed = re.search(pattern, output)
        assert resumed, output[-3000:]
        assert n <= int(resumed.group(1)) < n_samples  # from its last finished sample, not from zero
        assert cells[cell_id]["runs"][-2]["ended"].startswith("unrecorded")
    for text in ("Ray: joining", "died", "requeueing", "resuming from", "file write(s)", "done, 0 cached"):
        timeline.append((sweep.first(text) or -1.0, text))
    print("\nmulti-node timeline (s since the sweep started):")
    for when, what in sorted(timeline):
        print(f"  {when:7.1f}  {what}")
    print(f"driver peak RSS {sweep.max_rss / 2**20:.0f} MiB")
    print("".join(line for _, line in sweep.lines if "file write(s)" in line))
