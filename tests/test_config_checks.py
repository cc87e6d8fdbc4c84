"""Issue 15, items 8 and 9: a cell config that would compute nothing is an error naming its key.

Checked before any model work (`validate_cell`) and again where a cell batch runs (`run_cells`): an
invalid cell fails alone, and no config ends `done` with nothing computed. Also: `seed` belongs to
patching only, so it changes no other cell's id.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import cell_config

from mmflow.config.validate import CellConfigError, validate_cell
from mmflow.execution.runtime import run_cells
from mmflow.storage.store import cell_id


def meta_of(outcome) -> dict:
    return json.loads((Path(outcome.path) / "cell.json").read_text())


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ({"n_samples": 0}, "n_samples"),
        ({"window": 0}, "window"),
        ({"window": 9}, "window"),
        ({"window": 2.5}, "window"),
        ({"window": 2.0}, "window"),
        ({"window": True}, "window"),
        ({"window": "3"}, "window"),
        ({"knockout": {"name": "last_to_image", "source": "last", "target": "image"}}, "knockout.source"),
        (
            {"knockout": {"name": "question_to_image", "source": "question", "target": "object"}},
            "knockout.source",
        ),
        ({"knockout": {"name": "x", "source": "imgae", "target": "last"}}, "knockout.source"),
        ({"analysis": "patching", "seed": "abc"}, "seed"),
        ({"task": "QueryColour"}, "task"),
        (
            {
                "analysis": "patching",
                "patching": {"groups": ["image", "qestion"], "noise_scale": 3, "margin": 0},
            },
            "patching.groups",
        ),
        ({"knockout": {"name": "k", "source": "image", "target": "last", "heads": "eech"}}, "knockout.heads"),
        (
            {"knockout": {"name": "k", "source": "image", "target": "last", "heads": [1, -2]}},
            "knockout.heads",
        ),
        ({"knockout": {"name": "k", "source": "image", "target": "last", "heads": []}}, "knockout.heads"),
        ({"analysis": "answer_tracking", "lens": "tuned"}, "lens"),
    ],
)
def test_a_cell_that_computes_nothing_is_an_error_naming_the_key(tmp_path, changes, key):
    with pytest.raises(CellConfigError) as err:
        validate_cell(cell_config(tmp_path, **changes))
    assert err.value.key == key and str(err.value).startswith(f"{key}=")


def test_a_non_integer_window_is_named_as_written(tmp_path):
    from mmflow.sweep.record import labels

    config = cell_config(tmp_path, window=2.5)
    with pytest.raises(CellConfigError, match=r"^window=2\.5: must be an integer in 1\.\.8$"):
        validate_cell(config)
    assert labels(config)["window"] == 2.5  # the failed cell's line says /2.5, not /2
    assert labels(cell_config(tmp_path, window=3))["window"] == 3


@pytest.mark.parametrize(
    "changes",
    [
        {"analysis": "answer_tracking", "lens": "rwa"},
        {"analysis": "patching", "corruption": "nois", "patching": {"groups": ["image"], "margin": 0.05}},
    ],
)
def test_an_invalid_cell_still_has_labels_for_the_sweep_record(tmp_path, changes):
    """Its analysis cannot be built, but the sweep record names it (the sweep must not stop there)."""
    from mmflow.sweep.record import labels

    config = cell_config(tmp_path, **changes)
    with pytest.raises(CellConfigError):
        validate_cell(config)
    assert labels(config) == {
        "model": "tiny-llava",
        "task": config["task"],
        "variant": changes["analysis"],
        "window": None,
    }


def test_an_unknown_dtype_is_refused_before_the_model_loads(tmp_path):
    from mmflow.config.validate import DTYPES
    from mmflow.models.registry import DTYPES as LOADED

    config = cell_config(tmp_path)
    config["model"] = {**config["model"], "dtype": "float23"}
    with pytest.raises(CellConfigError, match=r"^model\.dtype='float23': unknown model\.dtype"):
        validate_cell(config)
    assert set(DTYPES) == set(LOADED)  # the names the loader maps to torch


def test_valid_cells_pass_validation(tmp_path):
    for source, target in [
        ("image", "question"),
        ("image", "last"),
        ("question", "last"),
        ("last", "last"),
        ("object", "question"),
        ("true_option", "last"),
    ]:
        validate_cell(cell_config(tmp_path, knockout={"name": "k", "source": source, "target": target}))
    validate_cell(cell_config(tmp_path, window=8))
    validate_cell(cell_config(tmp_path, analysis="answer_tracking", lens="raw"))


def test_an_invalid_cell_fails_alone_in_its_group(tiny_llava, tmp_path):
    good, bad = cell_config(tmp_path, window=3), cell_config(tmp_path, window=0)
    out_bad, out_good = run_cells(tiny_llava, [bad, good])
    assert out_good.status == "done"
    assert out_bad.status == "failed" and out_bad.error.startswith("CellConfigError: window=0")


def test_configs_that_compute_nothing_fail_instead_of_finishing_done(tiny_llava, tmp_path):
    blind = {"name": "last_to_image", "source": "last", "target": "image"}  # blocks no causal edge
    for changes, key in [({"n_samples": 0}, "n_samples"), ({"knockout": blind}, "knockout.source")]:
        (outcome,) = run_cells(tiny_llava, [cell_config(tmp_path, **changes)])
        assert outcome.status == "failed" and outcome.error.startswith(f"CellConfigError: {key}="), outcome
        assert meta_of(outcome)["status"] == "failed"


def test_seed_changes_no_knockout_cell_and_cell_ids_stay_the_same():
    # ids computed on main before the change (mmflow.storage.store.cell_id of these exact configs)
    config = {
        "model": {
            "name": "tiny-llava",
            "checkpoint": "tiny:tiny-llava",
            "n_layers": 8,
            "resources": {"gpus": 0},
        },
        "data": {"name": "shapes", "seed": 0, "cache_dir": None},
        "knockout": {"name": "image_to_question", "source": "image", "target": "question"},
        "engine": {"name": "fast", "attention": "sdpa"},
        "task": "ChooseAttr",
        "window": 3,
        "n_samples": 8,
        "require_correct": False,
        "max_new_tokens": 8,
        "analysis": "knockout",
        "results_dir": "/x",
        "logger": {"name": "none"},
    }
    assert cell_id(config) == cell_id({**config, "seed": 0}) == "431f7f0360d2cb14"
    # where the synthetic data is cached does not change what is computed, nor the id
    assert cell_id({**config, "data": {**config["data"], "cache_dir": "/elsewhere"}}) == "431f7f0360d2cb14"
    tracking = {k: v for k, v in config.items() if k not in ("knockout", "window")}
    assert cell_id({**tracking, "analysis": "answer_tracking", "lens": "norm"}) == "78dd9b3c9476986c"
    legacy = sorted((Path(__file__).parent / "fixtures" / "legacy_results").glob("*/cell.json"))
    for path in legacy:  # cells computed by main 13f7c92, each with `seed: 0` in its config
        old = json.loads(path.read_text())["config"]
        assert old.pop("seed") == 0 and cell_id(old) == path.parent.name
    # seed is patching's noise seed (conf/analysis/patching.yaml): other cells have no such key,
    # so `seed=7` on a knockout cell is an error instead of a new id for the same computation
    from hydra import compose, initialize_config_dir
    from hydra.errors import ConfigCompositionException

    from mmflow.config.dirs import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        assert "seed" not in compose(config_name="config")
        assert compose(config_name="config", overrides=["analysis=patching"]).seed == 0
        with pytest.raises(ConfigCompositionException):
            compose(config_name="config", overrides=["seed=7"])
