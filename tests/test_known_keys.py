"""Unknown keys are errors: `+n_sampels=3` is refused with one line naming `n_samples`, and a key the
cell's analysis, model, data source, engine or logger does not define is refused too."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from mmflow.cli import cell_config
from mmflow.config.dirs import CONF_DIR
from mmflow.config.known_keys import check_known_keys, schema, unknown_keys
from mmflow.errors import CellConfigError

ROOT = Path(__file__).resolve().parents[1]


def composed(overrides: list[str], name: str = "config") -> dict:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name=name, overrides=[*overrides, "results_dir=/tmp/mmflow-known-keys"])
    return OmegaConf.to_container(cfg, resolve=False)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["+n_sampels=3"],
            "n_sampels=3: unknown key, no config of this cell defines it; did you mean n_samples?",
        ),
        (["+model.n_layer=3"], "did you mean model.n_layers?"),
        (["+model.resources.gpu=1"], "did you mean model.resources.gpus?"),
        (["+engine.atention=eager"], "did you mean engine.attention?"),
        (["analysis=patching", "+patching.noise_scal=2"], "did you mean patching.noise_scale?"),
        (["+knockout.head=each"], "did you mean knockout.heads?"),
        # defined by another option of the group, not by the cell's own: still refused
        (["+model.parity=paper"], "model.parity='paper': unknown key"),  # tiny models have no paper code
        (["data=gqa", "+data.seed=1"], "data.keys: image_dir, name"),
        (["logger=none", "+logger.project=x"], "logger.keys: name"),
        (["+zzz=1"], "top-level keys: analysis, data, engine, knockout, logger, max_new_tokens"),
    ],
)
def test_a_key_no_config_of_the_cell_defines_is_refused_naming_the_closest(overrides, message) -> None:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[*overrides, "results_dir=/tmp/mmflow-known-keys"])
    with pytest.raises(CellConfigError) as refused:
        cell_config(cfg)
    assert message in str(refused.value) and "\n" not in str(refused.value)


@pytest.mark.parametrize(
    "overrides",
    [
        ["+model.device_map=auto"],
        ["+model.max_tokens=512"],
        ["data=table", "data.path=x.csv", "data.image_dir=imgs", "+data.allow_images_outside=true"],
    ],
)
def test_optional_keys_the_yaml_leaves_out_are_accepted(overrides: list[str]) -> None:
    """Keys mmflow reads but no shipped YAML sets (so existing cell ids keep them out)."""
    check_known_keys(composed(overrides))


def test_a_misspelt_optional_key_is_refused() -> None:
    with pytest.raises(CellConfigError, match="did you mean model.device_map?"):
        check_known_keys(composed(["+model.devise_map=auto"]))


def test_answer_tracking_has_no_window_and_lists_the_keys_it_has() -> None:
    with pytest.raises(CellConfigError, match=r"window=3: unknown key.*top-level keys: .*lens"):
        check_known_keys(composed(["analysis=answer_tracking", "+window=3"]))


MODELS = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))


@pytest.mark.parametrize("model", MODELS)
def test_every_shipped_model_with_every_analysis_is_accepted(model: str) -> None:
    assert len(MODELS) == 16
    for analysis in ("knockout", "answer_tracking", "patching"):
        config = composed([f"model={model}", f"analysis={analysis}"])
        assert unknown_keys(config, schema(config)) == [], (model, analysis)


@pytest.mark.parametrize(
    "overrides",
    [
        ["data=gqa"],
        ["data=table", "data.path=x.csv", "data.image_dir=img"],
        ["engine=reference", "engine.attention=eager"],
        ["logger=none"],
        ["knockout=custom", "knockout.source=image", "knockout.target=last", "knockout.heads=[0,3]"],
        ["model.resources.gpus=2", "model.checkpoint=/models/x"],
    ],
)
def test_every_shipped_option_is_accepted(overrides: list[str]) -> None:
    check_known_keys(composed(overrides))


@pytest.mark.parametrize("sweep", sorted(p.stem for p in (ROOT / "sweeps").glob("*.yaml")))
def test_every_named_sweep_is_accepted(sweep: str) -> None:
    config = composed([], name=sweep)
    config.pop("hydra", None)
    check_known_keys(config)


def test_mmflow_run_refuses_the_misspelt_key_with_one_line_before_loading_anything(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    command = [
        sys.executable,
        "-m",
        "mmflow.cli",
        "run",
        "+n_sampels=3",
        f"results_dir={tmp_path}",
        "logger=none",
    ]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines() == [
        "[mmflow] error: n_sampels=3: unknown key, no config of this cell defines it; did you mean n_samples?"
    ]
    assert not list(tmp_path.glob("*/cell.json"))  # no cell folder: nothing was computed
