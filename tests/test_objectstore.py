"""`results_dir=s3://…` against moto's S3 server on 127.0.0.1 (fake credentials, no network).

The driver writes a local mirror and uploads each file whole; a sweep killed mid-cell resumes from
what the store holds, on a machine whose mirror is empty.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from ray_nodes import free_port
from test_faults_launch import finish, wait_for

from mmflow.storage.objectstore import is_uri, mirror_dir, uri_of

ROOT = Path(__file__).resolve().parents[1]
BUCKET = "mmflow-test"
N = 40  # samples: the tiny model computes ~4 a second, the first sweep is killed after one


@pytest.fixture(scope="module")
def s3_endpoint():
    pytest.importorskip("s3fs")
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3(s3_endpoint, tmp_path, monkeypatch):
    """A fresh bucket and the environment a driver needs to reach it (fsspec reads FSSPEC_S3_*)."""
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "FSSPEC_S3_ENDPOINT_URL": s3_endpoint,
        "MMFLOW_RESULTS_MIRROR": str(tmp_path / "mirror"),
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    import fsspec.config
    import s3fs

    fsspec.config.set_conf_env(fsspec.config.conf)  # FSSPEC_S3_ENDPOINT_URL, read at import otherwise
    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint, skip_instance_cache=True)
    if fs.exists(BUCKET):
        fs.rm(BUCKET, recursive=True)
    fs.mkdir(BUCKET)
    yield fs, env


def sweep(env: dict[str, str], uri: str, n_samples: int, *extra: str) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "launch.py",
        "-m",
        "model=tiny-llava",
        "logger=none",
        f"results_dir={uri}",
        "task=ChooseAttr",
        "knockout=image_to_question",
        "window=1",
        f"n_samples={n_samples}",
        "hydra.launcher.executor=local",
        "hydra.launcher.progress=log",
        *extra,
    ]
    return subprocess.Popen(
        cmd, cwd=ROOT, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def test_uris_map_to_their_mirror_and_back(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("MMFLOW_RESULTS_MIRROR", str(tmp_path))
    assert is_uri("s3://b/x") and is_uri("gs://b") and not is_uri("/tmp/x") and not is_uri("results")
    assert mirror_dir("s3://b/x/y") == tmp_path / "s3" / "b" / "x" / "y"
    assert uri_of(tmp_path / "s3" / "b" / "x" / "c1" / "cell.json") == "s3://b/x/c1/cell.json"
    assert uri_of(tmp_path.parent / "elsewhere") is None
    with pytest.raises(ValueError, match="bucket"):
        mirror_dir("s3://")


def test_a_store_uri_leaves_the_cell_id_as_a_local_folder_gives_it(tmp_path, monkeypatch) -> None:
    """The same cell in a bucket and in a folder: one id (results_dir/results_uri are not semantic)."""
    from hydra import compose, initialize_config_dir

    from mmflow.cli import cell_config
    from mmflow.config.dirs import CONF_DIR
    from mmflow.storage.store import cell_id

    monkeypatch.setenv("MMFLOW_RESULTS_MIRROR", str(tmp_path / "mirror"))
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        local = cell_config(
            compose("config", overrides=[f"results_dir={tmp_path / 'r'}", "model=tiny-llava"])
        )
        stored = cell_config(compose("config", overrides=["results_dir=s3://b/r/", "model=tiny-llava"]))
    assert stored["results_uri"] == "s3://b/r" and stored["results_dir"] == str(tmp_path / "mirror/s3/b/r")
    assert "results_uri" not in local and cell_id(local) == cell_id(stored)


def test_a_killed_cell_resumes_from_the_store_on_a_fresh_machine(s3, tmp_path) -> None:
    fs, env = s3
    uri = f"s3://{BUCKET}/runs"
    first = sweep(env, uri, N)

    def a_part_in_s3() -> bool:
        fs.invalidate_cache()
        return bool(fs.glob(f"{BUCKET}/runs/*/parts/samples-*.parquet"))

    wait_for(a_part_in_s3, 300, "a part in S3", first)
    first.send_signal(signal.SIGKILL)  # the driver dies mid-cell: no clean-up, no last writes
    finish(first)
    fs.invalidate_cache()
    (cell_key,) = {k.split("/")[2] for k in fs.glob(f"{BUCKET}/runs/*/cell.json")}
    killed = json.loads(fs.cat(f"{BUCKET}/runs/{cell_key}/cell.json"))
    kept = len(fs.glob(f"{BUCKET}/runs/{cell_key}/parts/samples-*.parquet"))
    assert killed["status"] == "running" and 1 <= kept < N
    assert not fs.glob(f"{BUCKET}/runs/{cell_key}/.lock*")  # locks stay on the driver

    shutil.rmtree(tmp_path / "mirror")  # a new driver machine: only the store is left
    second = sweep(env, uri, N)
    out = finish(second)
    fs.invalidate_cache()
    assert second.returncode == 0, out[-3000:]
    assert f"resuming from {kept} recorded sample(s)" in out, out[-3000:]
    meta = json.loads(fs.cat(f"{BUCKET}/runs/{cell_key}/cell.json"))
    assert meta["status"] == "done"
    samples = pd.read_parquet(io.BytesIO(fs.cat(f"{BUCKET}/runs/{cell_key}/samples.parquet")))
    results = pd.read_parquet(io.BytesIO(fs.cat(f"{BUCKET}/runs/{cell_key}/results.parquet")))
    assert len(samples) == N and samples["question_id"].is_unique
    assert set(results["question_id"]) <= set(samples["question_id"]) and len(results) > 0
    assert not fs.glob(f"{BUCKET}/runs/{cell_key}/parts/*")  # cleared in the store too
    assert not fs.glob(f"{BUCKET}/runs/{cell_key}/.lock*")
    assert meta["config"]["results_uri"] == uri

    third = sweep(env, uri, N)  # finished: read from the store, nothing computed again
    out = finish(third)
    assert third.returncode == 0 and "cached" in out, out[-3000:]


def test_a_missing_bucket_is_one_line_before_anything_runs(s3, tmp_path) -> None:
    _, env = s3
    proc = sweep(env, "s3://no-such-bucket/r", 1)
    out = finish(proc)
    assert proc.returncode == 2, out[-3000:]
    assert "results store unreachable" in out and "bucket no-such-bucket does not exist" in out
    assert "Traceback" not in out and not list((tmp_path / "mirror").rglob("cell.json"))


def test_workers_writing_a_store_is_refused(s3) -> None:
    _, env = s3
    proc = sweep(env, f"s3://{BUCKET}/w", 1, "hydra.launcher.write_results=workers")
    out = finish(proc)
    assert proc.returncode == 2 and "only the driver writes it" in out, out[-3000:]


@pytest.mark.ray
@pytest.mark.slow
def test_a_sweep_on_a_cluster_writes_its_cells_to_the_store(ray_cluster, s3) -> None:
    """Actors relay every write to the driver (forced for a URI), which uploads it."""
    fs, env = s3
    uri = f"s3://{BUCKET}/cluster"
    proc = sweep(  # joins the loopback test cluster in the tests' own Ray settings (as test_launcher)
        env,
        uri,
        2,
        "knockout=image_to_question,question_to_last",
        "hydra.launcher.executor=ray",
        f"hydra.launcher.ray.init.address={ray_cluster.address}",
    )
    out = finish(proc)
    assert proc.returncode == 0, out[-3000:]
    assert "file write(s)" in out  # relayed through the driver
    fs.invalidate_cache()
    metas = [json.loads(fs.cat(key)) for key in fs.glob(f"{BUCKET}/cluster/*/cell.json")]
    assert len(metas) == 2 and {m["status"] for m in metas} == {"done"}
    for meta in metas:
        samples = pd.read_parquet(io.BytesIO(fs.cat(f"{BUCKET}/cluster/{meta['cell_id']}/samples.parquet")))
        assert len(samples) == 2
