"""The Ray launcher, for real: `python launch.py -m …` in a subprocess joins the session's Ray cluster.

No mocks and no local mode: actors load the tiny models, cells are written to `tmp_path`, and the
tests read what a person would read (cell.json, sweep.json, the parquet files, the exit code).
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import add_loopback_node, ray_sweep_cmd
from hydra import compose, initialize_config_dir

from mmflow.config.dirs import CONF_DIR

pytestmark = pytest.mark.slow  # runs sweeps, trains or builds for real: `make test`, not `make test-fast`

ROOT = Path(__file__).resolve().parents[1]
N_LAYERS = 8  # both tiny models
TASKS = ("ChooseAttr", "ChooseCat", "ChooseRel", "CompareAttr", "LogicalObj", "QueryAttr")


@pytest.fixture(scope="module", autouse=True)
def tiny_models_built() -> None:
    """Build (or find) the tiny models once, so concurrent actors never race to build them."""
    from mmflow.models.synthetic.tiny import ensure_tiny_model

    ensure_tiny_model("tiny-llava")
    ensure_tiny_model("tiny-llava-next")


def run_sweep(results: Path, sweep_dir: Path, address: str, *overrides: str) -> subprocess.CompletedProcess:
    cmd = ray_sweep_cmd(results, sweep_dir, address, *overrides)
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


def read_cells(results: Path) -> dict[str, dict]:
    """cell.json of every cell folder under `results`, by cell id."""
    cells = {}
    for path in results.glob("*/cell.json"):
        try:
            cells[path.parent.name] = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):  # not there yet
            continue
    return cells


def assert_complete(cell_dir: Path, n_samples: int) -> None:
    """All samples present once, one row per (sample, layer), no leftover part files."""
    samples = pd.read_parquet(cell_dir / "samples.parquet")
    results = pd.read_parquet(cell_dir / "results.parquet")
    assert len(samples) == n_samples and samples["question_id"].is_unique
    assert (samples["status"] == "scored").all()
    assert len(results) == n_samples * N_LAYERS
    assert not results.duplicated(["question_id", "layer"]).any()
    assert set(results["question_id"]) == set(samples["question_id"])
    assert not (cell_dir / "parts").exists()


def parts(cell_dir: Path) -> int:
    """How many samples a running cell has recorded, if some but not all of them (else 0)."""
    n = len(list((cell_dir / "parts").glob("samples-*.parquet")))
    meta = json.loads((cell_dir / "cell.json").read_text())
    return n if n < meta["config"]["n_samples"] else 0


def combos(cells: list[dict]) -> set[tuple[str, int]]:
    return {(c["config"]["knockout"]["name"], c["config"]["window"]) for c in cells}


# ----------------------------------------------------------------------------- config (no Ray)


@pytest.mark.parametrize(
    ("name", "n_jobs"),
    [("smoke", 2 * 2 * 2), ("paper", 4 * 6 * 6), ("windows", 6 * 6), ("toy", 6 * 4), ("toy_patching", 3)],
)
def test_named_sweeps_compose_onto_the_mmflow_launcher(name: str, n_jobs: int, monkeypatch, tmp_path) -> None:
    monkeypatch.chdir(tmp_path)  # the configs are found in the package, from any folder
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name=name, return_hydra_config=True)
    assert cfg.hydra.launcher._target_ == "hydra_plugins.mmflow_launcher.MmflowLauncher"
    assert cfg.hydra.mode.name == "MULTIRUN" and cfg.sweep_name == name
    sizes = [len(str(v).split(",")) for v in cfg.hydra.sweeper.params.values()]
    assert int(pd.Series(sizes).prod()) == n_jobs
    if name in ("paper", "windows"):
        assert cfg.hydra.sweeper.params.data == "gqa"


def test_default_config_uses_the_launcher_and_a_local_ray() -> None:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", return_hydra_config=True)
    assert cfg.hydra.launcher._target_ == "hydra_plugins.mmflow_launcher.MmflowLauncher"
    assert cfg.hydra.launcher.reuse_models is True and not cfg.hydra.launcher.ray.init.address
    assert "ray" not in cfg  # where Ray runs is no cell key
    assert cfg.model.name == "toy-llava" and cfg.data.name == "shapes"  # the trained toy is the default
    assert cfg.window == 2 and cfg.require_correct is True


def test_actor_resources_map_gpus_to_cpu_and_reject_impossible_requests() -> None:
    from mmflow.sweep.plan import ModelPlan
    from mmflow.sweep.ray_executor import GIB, actor_options
    from mmflow.sweep.settings import SweepSettings as MmflowLauncherConf

    model = {"name": "llava-1.5-13b", "resources": {"gpus": 1, "cpus": 4, "memory_gb": 40}}
    plan = ModelPlan("key", "llava-1.5-13b", model, "sdpa", replicas=1)
    cpu_only = {"CPU": 2.0, "GPU": 0.0, "memory": 16.0 * GIB}
    options = actor_options(plan, MmflowLauncherConf(), cpu_only)
    assert (options["num_gpus"], options["num_cpus"], options["memory"]) == (0.0, 2.0, 16 * GIB)
    assert options["scheduling_strategy"] == "SPREAD" and options["max_restarts"] == 0

    gpu_nodes = {"CPU": 32.0, "GPU": 1.0, "memory": 200.0 * GIB}
    options = actor_options(plan, MmflowLauncherConf(), gpu_nodes)
    assert (options["num_gpus"], options["num_cpus"], options["memory"]) == (1.0, 4.0, 40 * GIB)
    shared = MmflowLauncherConf(models={"llava-1.5-13b": {"gpus": 0.5}})
    assert actor_options(plan, shared, gpu_nodes)["num_gpus"] == 0.5  # two small models per GPU
    with pytest.raises(ValueError, match="needs 2 GPUs on one node; the largest has 1"):
        actor_options(plan, MmflowLauncherConf(models={"llava-1.5-13b": {"gpus": 2}}), gpu_nodes)


def test_a_temp_file_left_by_a_killed_writer_does_not_block_finishing(tmp_path: Path) -> None:
    from mmflow.storage.store import CellStore

    store = CellStore(tmp_path, {"task": "ChooseAttr", "n_samples": 1})
    store.write_sample("q1", {"order": 0, "question_id": "q1"}, [{"question_id": "q1", "layer": 0}])
    (store.parts / ".samples-0123.parquet.x1y2z3").write_bytes(b"half a file")  # killed mid-write
    keys = ["question_id", "layer"]
    samples, results = store.finish(["order", "question_id"], keys, sort_by=keys)
    store.clear_parts()
    assert (len(samples), len(results)) == (1, 1) and not store.parts.exists()


# ------------------------------------------------------------------------------ real sweeps


@pytest.mark.ray
@pytest.mark.slow
def test_grid_loads_each_model_once_shares_clean_passes_and_resumes(ray_cluster, tmp_path: Path) -> None:
    results = tmp_path / "results"
    grid = ("model=tiny-llava,tiny-llava-next", "knockout=image_to_question,question_to_last", "window=1,3")
    wandb = ("logger=wandb", "logger.mode=offline")  # the actors log one offline run per cell
    first = run_sweep(results, tmp_path / "sweep1", ray_cluster.address, *grid, "n_samples=2", *wandb)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]

    sweep = json.loads((tmp_path / "sweep1" / "sweep.json").read_text())
    assert sweep["status"] == "done" and sweep["failed"] == []
    assert sweep["counts"]["done"] == 8 and len(sweep["cells"]) == 8
    # one engine / noise-floor line per computed cell, printed by the driver (actors' own may be lost)
    noise_lines = [line for line in first.stderr.splitlines() if "numerical noise floor" in line]
    assert sorted(line.split("(cell ")[1][:16] for line in noise_lines) == sorted(
        c["cell_id"] for c in sweep["cells"]
    ), noise_lines
    assert len(list((tmp_path / "sweep1").glob("*/.hydra/overrides.yaml"))) == 8  # a Hydra job folder each
    cells = read_cells(results)
    assert set(cells) == {c["cell_id"] for c in sweep["cells"]}
    for model in ("tiny-llava", "tiny-llava-next"):
        mine = [c for c in cells.values() if c["config"]["model"]["name"] == model]
        assert combos(mine) == {(k, w) for k in ("image_to_question", "question_to_last") for w in (1, 3)}
        assert [c["status"] for c in mine] == ["done"] * 4
        assert len({c["actor_id"] for c in mine}) == 1  # one actor ran all four cells…
        assert [c["model_loads"] for c in mine] == [1] * 4  # …on weights it loaded once
        assert [c["clean_passes_per_sample"] for c in mine] == [1] * 4  # one clean pass served all four
        assert {c["node_id"] for c in mine} == {ray_cluster.head_node.node_id}
        assert [c["counts"]["scored"] for c in mine] == [2] * 4
    for cell_id in cells:
        assert_complete(results / cell_id, n_samples=2)
    run_dirs = list((results / "wandb").glob("offline-run-*"))
    assert {p.name.rsplit("-", 1)[-1] for p in run_dirs} >= set(cells)  # a W&B run per cell, id = cell id
    assert "wandb sync" in first.stdout + first.stderr
    index = (tmp_path / "sweep1" / "report" / "index.html").read_text()
    assert all(cell_id in index for cell_id in cells)  # the end-of-sweep report lists every cell

    files = [p for p in results.glob("*/*") if p.is_file() and p.parent.name in cells]
    mtimes = {p: p.stat().st_mtime_ns for p in files}
    again = run_sweep(results, tmp_path / "sweep2", ray_cluster.address, *grid, "n_samples=2", *wandb)
    assert again.returncode == 0, again.stderr[-3000:]
    rerun = json.loads((tmp_path / "sweep2" / "sweep.json").read_text())
    assert [c["status"] for c in rerun["cells"]] == ["cached"] * 8
    assert "8 finished before, 0 to compute" in again.stdout + again.stderr
    assert {p: p.stat().st_mtime_ns for p in files} == mtimes  # nothing was rewritten
    assert sorted(p for p in results.glob("*/*") if p.is_file() and p.parent.name in cells) == sorted(files)
    assert len(list((results / "wandb").glob("offline-run-*"))) == len(run_dirs) + 1  # only a new sweep run


@pytest.mark.ray
@pytest.mark.slow
def test_a_cell_with_bad_data_fails_alone_with_its_reason(ray_cluster, tmp_path: Path) -> None:
    results = tmp_path / "results"
    proc = run_sweep(
        results,
        tmp_path / "sweep",
        ray_cluster.address,
        "model=tiny-llava",
        "task=ChooseAttr,NoSuchTask",
        "knockout=question_to_last",
        "window=1",
        "n_samples=2",
    )
    assert proc.returncode != 0  # the sweep says something failed…
    sweep = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    status = {c["task"]: c["status"] for c in sweep["cells"]}
    assert status == {"ChooseAttr": "done", "NoSuchTask": "failed"}  # …but only that cell
    bad = next(c for c in sweep["cells"] if c["task"] == "NoSuchTask")
    assert sweep["failed"] == [bad["cell_id"]] and sweep["status"] == "failed"
    meta = json.loads((results / bad["cell_id"] / "cell.json").read_text())
    assert meta["status"] == "failed"
    assert "unknown task 'NoSuchTask'" in meta["error"]
    assert "FAILED x1: " in proc.stdout and f"first: {bad['cell_id']}" in proc.stdout  # grouped, named
    good = next(c for c in sweep["cells"] if c["task"] == "ChooseAttr")
    assert_complete(results / good["cell_id"], n_samples=2)


@pytest.mark.ray
@pytest.mark.slow
def test_multi_node_sweep_survives_losing_a_node(ray_cluster, tmp_path: Path) -> None:
    """Three actors on a head (2 CPUs) and a worker (1 CPU); the worker goes away mid-batch.

    The node is removed as soon as a cell on it has recorded some but not all of its samples, which
    happens whatever the timing: six samples a cell keep the head's two actors busy well past the
    worker's start, so the worker always gets a batch.
    """
    worker = add_loopback_node(ray_cluster, num_cpus=1)
    ray_cluster.wait_for_nodes()
    head_id, worker_id = ray_cluster.head_node.node_id, worker.node_id
    results, n_samples = tmp_path / "results", 6
    overrides = (
        "model=tiny-llava",
        f"task={','.join(TASKS)}",
        "knockout=image_to_question,question_to_last",
        "window=1",
        f"n_samples={n_samples}",
        "hydra.launcher.replicas=3",
    )
    cmd = ray_sweep_cmd(results, tmp_path / "sweep", ray_cluster.address, *overrides)
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    interrupted: set[str] = set()
    try:
        deadline = time.monotonic() + 180
        while proc.poll() is None and not interrupted and time.monotonic() < deadline:
            on_worker = {k: c for k, c in read_cells(results).items() if c.get("node_id") == worker_id}
            started = [k for k, c in on_worker.items() if c["status"] == "running" and parts(results / k)]
            if started:  # a batch there is part-way through its samples
                ray_cluster.remove_node(worker)
                interrupted = set(started)
            time.sleep(0.05)
        output, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert interrupted, "no cell on the worker node was ever part-way through its samples"
    assert proc.returncode == 0, output[-4000:]

    cells = read_cells(results)
    assert len(cells) == len(TASKS) * 2 and all(c["status"] == "done" for c in cells.values())
    assert {c["node_id"] for c in cells.values()} <= {head_id, worker_id}
    for cell_id in interrupted:  # started on the worker, rerun on the head, resumed from its parts
        assert cells[cell_id]["node_id"] == head_id and cells[cell_id]["attempt"] == 2
    for cell_id in cells:
        assert_complete(results / cell_id, n_samples=n_samples)
    assert "died" in output and "requeueing" in output


@pytest.mark.ray
@pytest.mark.slow
def test_a_cell_batch_that_runs_too_long_times_out_instead_of_hanging(ray_cluster, tmp_path: Path) -> None:
    results = tmp_path / "results"
    started = time.monotonic()
    proc = run_sweep(
        results,
        tmp_path / "sweep",
        ray_cluster.address,
        "model=tiny-llava-next",
        "knockout=question_to_last",
        "window=1",
        "n_samples=2",
        "hydra.launcher.batch_timeout_s=3",
        "hydra.launcher.group_retries=0",  # the deprecated name still works
    )
    assert proc.returncode != 0 and time.monotonic() - started < 90
    sweep = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    (cell,) = sweep["cells"]
    assert cell["status"] == "failed" and sweep["failed"] == [cell["cell_id"]]
    meta = json.loads((results / cell["cell_id"] / "cell.json").read_text())
    assert meta["status"] == "failed" and "cell batch timed out after 3 s" in meta["error"]
    assert meta["attempt"] == 1 and "gave up after 1 attempt(s)" in meta["error"]
    assert "hydra.launcher.group_retries is deprecated" in proc.stdout + proc.stderr
