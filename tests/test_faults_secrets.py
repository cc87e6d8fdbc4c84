"""Issue 23, item 1: nothing mmflow starts writes a secret anywhere, command line included.

Every file under the results folder, the W&B offline folder and Ray's session folder is searched for
each secret value, given in the environment and as overrides.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from mmflow.storage.secrets import REDACTED, redact_argv

ROOT = Path(__file__).resolve().parents[1]
ENV_SECRETS = {"HF_TOKEN": "hf_EnvS3cretA", "WANDB_API_KEY": "wb_EnvS3cretB"}
ARG_SECRETS = {"+hydra.launcher.ray.init.runtime_env.env_vars.HF_TOKEN": "hf_ArgS3cretC"}
# Keys no config of a cell defines: refused before anything runs (mmflow.config.known_keys), value not echoed.
REFUSED_SECRETS = {"+logger.api_key": "wb_ArgS3cretD", "+db.password": "pw_ArgS3cretE"}
ALL_ARG_SECRETS = {**ARG_SECRETS, **REFUSED_SECRETS}


def leaks(folder: Path, values) -> list[str]:
    """`file: value` for every file below `folder` holding one of `values` (bytes, any encoding)."""
    found = []
    for path in (p for p in folder.rglob("*") if p.is_file() and not p.is_symlink()):
        data = path.read_bytes()
        found += [f"{path}: {v}" for v in values if v.encode() in data]
    return found


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short folder: Ray's session sockets must fit in 107 characters."""
    path = Path(tempfile.mkdtemp(prefix="mmf", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_command_line_secrets_are_redacted_in_place():
    argv = ["launch.py", "-m", *(f"{k}={v}" for k, v in ALL_ARG_SECRETS.items()), "window=3"]
    assert redact_argv(argv) is argv
    assert argv == ["launch.py", "-m", *(f"{k}={REDACTED}" for k in ALL_ARG_SECRETS), "window=3"]


def test_wandb_run_files_hold_no_secret_from_the_command_line(tmp_path, monkeypatch):
    """W&B saves `sys.argv` in the run (`wandb sync` uploads it): `init_run` gives it redacted."""
    from mmflow.wandb_logger.settings import init_run

    monkeypatch.setenv("WANDB_MODE", "offline")
    argv = ["launch.py", *(f"{k}={v}" for k, v in ALL_ARG_SECRETS.items()), "n_samples=1"]
    monkeypatch.setattr(sys, "argv", list(argv))
    run = init_run({"project": "mmflow-test", "mode": "offline"}, tmp_path, id="secrets")
    run.log({"x": 1})
    run.finish()
    assert sys.argv == argv  # given back as it was
    assert list(tmp_path.glob("wandb/offline-run-*/*.wandb"))
    assert leaks(tmp_path, ALL_ARG_SECRETS.values()) == []


@pytest.mark.ray
@pytest.mark.slow
def test_a_local_ray_gets_runtime_env_secrets_without_logging_them(short_tmp, monkeypatch):
    """The actors see `runtime_env.env_vars`; Ray's runtime_env agent log never does."""
    import ray

    from mmflow.sweep.ray_session import ray_session
    from mmflow.sweep.settings import RaySettings

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("MMFLOW_PLAIN", raising=False)
    env_vars = {"HF_TOKEN": "hf_RayS3cretF", "MMFLOW_PLAIN": "pl41nValue"}
    init = {"num_cpus": 1, "_temp_dir": str(short_tmp / "ray"), "runtime_env": {"env_vars": env_vars}}

    @ray.remote
    def seen() -> tuple[str | None, str | None]:
        return os.environ.get("HF_TOKEN"), os.environ.get("MMFLOW_PLAIN")

    with ray_session(RaySettings(init=init, forward_env=[])):
        assert ray.get(seen.remote(), timeout=120) == ("hf_RayS3cretF", "pl41nValue")
    assert "HF_TOKEN" not in os.environ and "MMFLOW_PLAIN" not in os.environ  # given back
    assert list((short_tmp / "ray").glob("session_*/logs/*"))
    assert leaks(short_tmp / "ray", ["hf_RayS3cretF", "pl41nValue"]) == []


@pytest.mark.ray
@pytest.mark.slow
def test_a_sweep_writes_no_secret_in_results_wandb_or_ray_session(short_tmp):
    """`launch.py -m` with W&B offline and a local Ray: secrets in the environment and as overrides."""
    from mmflow.models.synthetic.tiny import ensure_tiny_model

    ensure_tiny_model("tiny-llava")
    results, ray_dir = short_tmp / "res", short_tmp / "ray"
    cmd = [
        sys.executable,
        "launch.py",
        "-m",
        "model=tiny-llava",
        "n_samples=1",
        "logger=wandb",
        "logger.mode=offline",
        f"results_dir={results}",
        "hydra.launcher.ray.init.num_cpus=1",
        f"+hydra.launcher.ray.init._temp_dir={ray_dir}",
        "hydra.launcher.progress=log",
        *(f"{k}={v}" for k, v in ARG_SECRETS.items()),
    ]
    env = {**os.environ, **ENV_SECRETS, "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert len(list(results.glob("wandb/offline-run-*/*.wandb"))) == 2  # the cell's run and the sweep's
    assert list(ray_dir.glob("session_*/logs/runtime_env_agent.log"))
    secrets = [*ENV_SECRETS.values(), *ARG_SECRETS.values()]
    assert leaks(short_tmp, secrets) == []
    assert not any(s in proc.stdout + proc.stderr for s in secrets)
    for key, value in REFUSED_SECRETS.items():  # a secret under a key no config defines: one line, no echo
        refused = subprocess.run(
            [*cmd, f"{key}={value}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=400
        )
        assert refused.returncode == 2, refused.stderr[-2000:]
        assert "unknown key" in refused.stderr and "<redacted>" in refused.stderr
        assert value not in refused.stdout + refused.stderr and leaks(short_tmp, [value]) == []
