"""`mmflow prefetch` and the per-node model preflight, with local checkpoint folders (no network).

Nodes run on 127.0.0.1; a node without a model is a real `ray start` worker whose view of the
models folder is an empty private tmpfs (`unshare --mount`), as a machine with its own disk.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from ray_nodes import ENV, can_unshare, start_head, start_worker

from mmflow.sweep.prefetch import root_causes, sweep_models

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_folder() -> Path:
    from mmflow.models.synthetic.tiny import ensure_tiny_model

    return ensure_tiny_model("tiny-llava")


def checkpoint_copy(tiny_folder: Path, root: Path) -> Path:
    folder = root / "models" / "tiny-llava"
    shutil.copytree(tiny_folder, folder)
    return folder


def prefetch_cmd(tmp_path: Path, checkpoints: str, *overrides: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "mmflow.cli",
        "prefetch",
        f"results_dir={tmp_path / 'results'}",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        "logger=none",
        "model=tiny-llava",
        f"model.checkpoint={checkpoints}",
        "task=ChooseAttr",
        "knockout=image_to_question,question_to_last",
        "window=1",
        "n_samples=1",
        *overrides,
    ]


def run(
    cmd: list[str], timeout_s: float = 180, env: dict[str, str] = ENV
) -> subprocess.CompletedProcess[str]:
    """`env`: `ray_nodes.ENV` to join `ray start` nodes; the tests' own one for the loopback `ray_cluster`."""
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)


def test_root_causes_name_the_nodes_and_the_cells_each_missing_model_blocks() -> None:
    cells = {
        "a": {"model": {"checkpoint": "/m/one"}},
        "b": {"model": {"checkpoint": "/m/one"}},
        "c": {"model": {"checkpoint": "/m/two"}},
        "d": {"model": {"checkpoint": "tiny:tiny-llava"}},
    }
    models = sweep_models(cells)
    assert models == {("/m/one", None): ["a", "b"], ("/m/two", None): ["c"]}
    missing = "checkpoint folder /m/one does not exist"
    results = {
        "n1aaaaaaaaaa": {"node": "gpu1", "problems": {"/m/one": None, "/m/two": None}},
        "n2bbbbbbbbbb": {"node": "gpu2", "problems": {"/m/one": missing, "/m/two": None}},
        "n3cccccccccc": {"node": "gpu3", "problems": {"/m/one": missing, "/m/two": None}},
    }
    assert root_causes(results, models) == {
        f"{missing} on nodes gpu2 (n2bbbbbb), gpu3 (n3cccccc)": ["a", "b"]
    }


def test_prefetch_without_ray_checks_each_local_folder(tiny_folder: Path, tmp_path: Path) -> None:
    present = checkpoint_copy(tiny_folder, tmp_path)
    missing = tmp_path / "models" / "absent"
    done = run(prefetch_cmd(tmp_path, f"{present},{missing}", "hydra.launcher.executor=local"))
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"{present}: ready" in done.stdout
    assert f"checkpoint folder {missing} does not exist on node" in done.stdout
    assert "(blocks 2 cells)" in done.stdout  # two knockouts of the missing model
    assert not (tmp_path / "results").exists()  # nothing ran

    ok = run(prefetch_cmd(tmp_path, str(present), "hydra.launcher.executor=local"))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "missing" not in ok.stdout and ok.stdout.count(": ready") == 1


@pytest.mark.ray
def test_prefetch_on_a_cluster_checks_every_alive_node(
    ray_cluster, tiny_folder: Path, tmp_path: Path
) -> None:
    present = checkpoint_copy(tiny_folder, tmp_path)
    missing = tmp_path / "models" / "absent"
    address = f"hydra.launcher.ray.init.address={ray_cluster.address}"
    own = dict(os.environ)  # the loopback test cluster: joined in the tests' own Ray mode
    done = run(prefetch_cmd(tmp_path, f"{present},{missing}", address), env=own)
    assert done.returncode == 1, done.stdout + done.stderr
    nodes = len(json.loads(run([sys.executable, "-c", NODES, ray_cluster.address], env=own).stdout))
    assert done.stdout.count(f"{present}: ready") == nodes >= 1
    assert done.stdout.count(f"{missing}: missing: checkpoint folder {missing} does not exist") == nodes


NODES = """import json, sys, ray
ray.init(address=sys.argv[1], log_to_driver=False)
print(json.dumps([n["NodeID"] for n in ray.nodes() if n["Alive"]]))
"""


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.skipif(not can_unshare(), reason="needs `unshare --mount` and tmpfs (root)")
def test_a_node_without_the_model_is_named_and_its_cells_never_start(
    tiny_folder: Path, tmp_path: Path
) -> None:
    present = checkpoint_copy(tiny_folder, tmp_path)
    head, address = start_head(cpus=1)
    try:
        worker = start_worker(address, cpus=1, private=present.parent)  # its models folder is empty
        try:
            out = run(prefetch_cmd(tmp_path, str(present), f"hydra.launcher.ray.init.address={address}"))
            assert out.returncode == 1, out.stdout + out.stderr
            assert out.stdout.count(f"{present}: ready") == 1  # the head
            lines = [line for line in out.stdout.splitlines() if "blocks" in line]
            assert len(lines) == 1 and f"checkpoint folder {present} does not exist on node " in lines[0]

            sweep = [
                sys.executable,
                "launch.py",
                "-m",
                *prefetch_cmd(tmp_path, str(present))[4:],
                f"hydra.launcher.ray.init.address={address}",
                "hydra.launcher.progress=log",
            ]
            ran = run(sweep, timeout_s=240)
            assert ran.returncode == 1, ran.stdout[-3000:] + ran.stderr[-3000:]
            log = ran.stdout + ran.stderr
            assert f"preflight: checkpoint folder {present} does not exist on node" in log
            assert "(blocks 2 cells)" in log
            metas = [json.loads(p.read_text()) for p in (tmp_path / "results").glob("*/cell.json")]
            assert len(metas) == 2 and all(m["status"] == "failed" for m in metas)
            assert all("does not exist on node" in m["error"] for m in metas)
            assert not list((tmp_path / "results").glob("*/parts/*.parquet"))  # no cell started
        finally:
            worker.stop()
    finally:
        head.stop()
