"""Every `hydra.launcher…` override the README and docs/ show composes, and reaches `ray.init` as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from mmflow.config.dirs import CONF_DIR

ROOT = Path(__file__).resolve().parents[1]
README = "\n".join(p.read_text() for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))])


def readme_overrides() -> list[str]:
    """`hydra.launcher.<key>=<value>` as the README writes them (quoted ones whole, placeholders filled)."""
    quoted = re.findall(r"'(\+?hydra\.launcher\.[a-z_.]+=[^']+)'", README)
    rest = re.sub(r"'\+?hydra\.launcher\.[^']+'", "", README)
    plain = re.findall(r"(\+?hydra\.launcher\.[a-z_.]+=[^\s`'|)]+)", rest)
    return sorted({re.sub(r"<[^>]+>|…", "x", o) for o in quoted + plain})


def launcher_cfg(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides, return_hydra_config=True).hydra.launcher


def test_the_readme_shows_the_ray_cpu_limit() -> None:
    assert "hydra.launcher.ray.init.num_cpus=2" in readme_overrides()


@pytest.mark.parametrize("override", readme_overrides())
def test_every_documented_launcher_override_composes(override: str) -> None:
    key, value = override.lstrip("+").split("=", 1)
    cfg = launcher_cfg([override])
    got = OmegaConf.select(cfg, key.removeprefix("hydra.launcher."), throw_on_missing=True)
    assert got is not None, override
    if not value.startswith("{"):
        assert str(got).lower() == value.lower(), override


def test_every_documented_launcher_key_exists() -> None:
    # `+hydra.launcher…` adds a key (e.g. runtime_env.env_vars.HF_TOKEN): only the others must exist
    keys = set(re.findall(r"(?<!\+)hydra\.launcher\.([a-z_]+(?:\.[a-z_]+)*)\b(?!…)", README))
    cfg = launcher_cfg([])
    for key in sorted(keys - {"models"}):  # models: a per-model map, empty by default
        assert OmegaConf.select(cfg, key, default="MISSING") != "MISSING", key


@pytest.mark.parametrize(
    "override", ["num_cpus=2", "num_gpus=0", "object_store_memory=100000000", "namespace=x"]
)
def test_ray_init_keys_need_no_plus(override: str) -> None:
    key, value = override.split("=")
    assert str(launcher_cfg([f"hydra.launcher.ray.init.{override}"]).ray.init[key]) == value


def test_ray_init_gets_only_the_keys_that_are_set(monkeypatch) -> None:
    import ray

    from mmflow.sweep import ray_session as session
    from mmflow.sweep.settings import SweepSettings

    cfg = launcher_cfg(["hydra.launcher.ray.init.num_cpus=2"])
    settings = SweepSettings.from_dict(OmegaConf.to_container(cfg, resolve=True))
    seen: dict = {}
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: seen.update(kw))
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    monkeypatch.setattr(session, "forwarded_env", lambda *a: {})
    with session.ray_session(settings.ray):
        pass
    assert seen == {
        "address": "local",
        "num_cpus": 2,
        "log_to_driver": True,
        "runtime_env": None,
        "include_dashboard": False,
    }
