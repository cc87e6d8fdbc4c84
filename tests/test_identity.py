"""Issue 22, item 2: the typed cell. One module decides cell identity; every YAML key is decided.

`tests/test_legacy_results.py`, the OLD_IDS of `tests/test_parity.py` and `tests/test_table_identity.py`
guard that the ids themselves are unchanged; this file guards the spec and the rules around them.
"""

from __future__ import annotations

import dataclasses
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from conftest import cell_config
from omegaconf import OmegaConf

from mmflow.config.dirs import CONF_DIR, SWEEPS_DIR
from mmflow.config.identity import cell_id, covered, semantic_config
from mmflow.config.spec import CellSpec, DataSpec, EngineSpec, FrozenMap, ModelSpec
from mmflow.errors import CellConfigError

TYPED = {  # config group -> the spec type whose fields its keys are
    "model": ModelSpec,
    "engine": EngineSpec,
}
SKIPPED = {"defaults", "hydra"}  # Hydra's own: never part of a cell config


def field_names(kind: type) -> set[str]:
    return {f.name for f in dataclasses.fields(kind)}


def uncovered(tree: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys of `tree` that are neither a spec type's field nor decided by `config.identity`."""
    out = []
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if not prefix and key in SKIPPED:
            continue
        if covered(dotted):
            continue
        group = prefix.rstrip(".")
        if group in TYPED and key in field_names(TYPED[group]):
            continue
        if not prefix and key in field_names(CellSpec) and not isinstance(value, Mapping):
            continue
        if isinstance(value, Mapping) and (not prefix and key in ("model", "engine", "data") or value):
            out += uncovered(value, f"{dotted}.")
            continue
        out.append(dotted)
    return out


def yaml_trees() -> list[tuple[Path, dict[str, Any]]]:
    """Every YAML under conf/ and sweeps/, as a tree rooted at the cell config (group files nested)."""
    trees = []
    for path in sorted(CONF_DIR.rglob("*.yaml")) + sorted(SWEEPS_DIR.glob("*.yaml")):
        data = OmegaConf.to_container(OmegaConf.load(path), resolve=False) or {}
        group = path.parent.relative_to(CONF_DIR).as_posix() if path.is_relative_to(CONF_DIR) else "."
        if group not in (".", "analysis"):  # `# @package _global_` files and the top config are global
            data = {group: data}
        trees.append((path, data))
    return trees


def test_every_yaml_key_is_a_spec_field_or_covered_by_an_identity_rule():
    trees = yaml_trees()
    assert len(trees) > 30 and any(p.name == "patching.yaml" for p, _ in trees)
    missing = {f"{p.relative_to(CONF_DIR.parent)}: {key}" for p, tree in trees for key in uncovered(tree)}
    assert not missing, "decide how these keys enter cell ids (mmflow/config/identity.py):\n" + "\n".join(
        sorted(missing)
    )


def test_a_new_yaml_key_that_no_rule_covers_fails():
    assert uncovered({"patching": {"groups": ["image"], "new_knob": 1}}) == ["patching.new_knob"]
    assert uncovered({"model": {"name": "m", "checkpint": "x"}}) == ["model.checkpint"]
    assert uncovered({"data": {"name": "shapes", "resolution": 2}}) == ["data.resolution"]
    assert uncovered({"engine": {"name": "fast", "attention": "sdpa", "batch": 4}}) == ["engine.batch"]
    assert uncovered({"temperature": 0.5}) == ["temperature"]
    assert uncovered({"results_dir": "x", "logger": {"anything": 1}, "knockout": {"heads": None}}) == []


def test_every_model_yaml_key_is_a_model_spec_field():
    fields = field_names(ModelSpec)
    for path in sorted((CONF_DIR / "model").glob("*.yaml")):
        keys = set(OmegaConf.to_container(OmegaConf.load(path), resolve=False))
        assert keys <= fields, (path.name, keys - fields)


def test_the_spec_carries_the_id_of_its_config_and_pickles(tmp_path):
    config = cell_config(tmp_path)
    spec = CellSpec.from_config(config)
    assert spec.id == cell_id(config) and len(spec.id) == 16
    assert spec.checked and spec.config == config
    assert spec.model.name == "tiny-llava" and spec.model.n_layers == 8 and spec.model.parity is None
    assert spec.engine == EngineSpec("reference", "sdpa")
    assert spec.data == DataSpec("shapes", FrozenMap(config["data"]))
    assert spec.analysis.name == "knockout" and spec.analysis.settings["window"] == 3
    assert dict(spec.analysis.settings["knockout"])["source"] == "image"
    assert (spec.task, spec.n_samples, spec.seed, spec.max_new_tokens) == ("ChooseAttr", 2, 0, 2)
    again = pickle.loads(pickle.dumps(spec))
    assert again == spec and again.id == spec.id and again.config == config
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.n_samples = 3  # type: ignore[misc]
    with pytest.raises(TypeError):
        spec.analysis.settings["window"] = 4  # type: ignore[index]
    spec.config["window"] = 4  # a copy: the spec is unchanged
    assert spec.analysis.settings["window"] == 3 and spec.config["window"] == 3


def test_the_spec_id_is_the_canonical_id(tmp_path):
    """`knockout.heads: null` is the knockout as before heads existed: the same id as without it."""
    config = cell_config(tmp_path)
    with_heads = {**config, "knockout": {**config["knockout"], "heads": None}}
    assert CellSpec.from_config(with_heads).id == cell_id(config) != cell_id(with_heads)
    assert "heads" not in CellSpec.from_config(with_heads).config["knockout"]
    each = {**config, "knockout": {**config["knockout"], "heads": "each"}}
    assert CellSpec.from_config(each).id == cell_id(each) != cell_id(config)


def test_a_misspelt_model_key_is_an_error_not_none(tmp_path):
    config = cell_config(tmp_path)
    with pytest.raises(CellConfigError) as err:
        ModelSpec.from_mapping({**config["model"], "n_layer": 8})
    assert err.value.key == "model.n_layer" and "n_layers" in str(err.value)
    spec = ModelSpec.from_mapping(config["model"])
    with pytest.raises(AttributeError):
        spec.n_layer  # type: ignore[attr-defined]  # noqa: B018
    with pytest.raises(CellConfigError):
        CellSpec.from_config({**config, "model": {**config["model"], "revison": "main"}}, check=False)


def test_invalid_cells_get_an_id_and_fail_validation_once(tmp_path):
    config = cell_config(tmp_path, n_samples=0)
    spec = CellSpec.from_config(config, check=False)
    assert spec.id == cell_id(config) and not spec.checked
    with pytest.raises(CellConfigError) as err:
        spec.check()
    assert err.value.key == "n_samples"
    with pytest.raises(CellConfigError) as err:
        CellSpec.from_config(cell_config(tmp_path, engine={"name": "fast"}))
    assert err.value.key == "engine.attention"  # no second default in code: the YAML says sdpa
    with pytest.raises(CellConfigError) as err:
        CellSpec.from_config(cell_config(tmp_path, engine={"name": "fastest", "attention": "sdpa"}))
    assert err.value.key == "engine.name" and "fast, reference" in str(err.value)


def test_the_data_identity_rules(tmp_path):
    base = cell_config(tmp_path)
    elsewhere = {**base, "data": {**base["data"], "cache_dir": "/elsewhere"}}
    assert semantic_config(elsewhere)["data"]["cache_dir"] is None
    assert cell_id(elsewhere) == cell_id(base)
    table = {"name": "table", "path": "/a/t.csv", "image_dir": "/a", "format": "csv", "columns": None}
    with pytest.raises(ValueError, match="without data.sha256"):
        cell_id({**base, "data": table})
    moved = {**table, "path": "/b/t.csv", "sha256": "ab" * 32}
    assert cell_id({**base, "data": {**table, "sha256": "ab" * 32}}) == cell_id({**base, "data": moved})
    assert cell_id({**base, "data": moved}) != cell_id({**base, "data": {**moved, "sha256": "cd" * 32}})


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ({"require_correct": "yes"}, "require_correct"),
        ({"require_correct": None}, "require_correct"),
        ({"data": {"name": "shapes", "seed": -1, "cache_dir": None}}, "data.seed"),
        ({"data": {"name": "shapes", "seed": "0", "cache_dir": None}}, "data.seed"),
        ({"data": {"name": "images", "seed": 0}}, "data.name"),
        ({"engine": {"name": "fast", "attention": "flash"}}, "engine.attention"),
    ],
)
def test_the_spec_checks_types_ranges_and_choices_once(tmp_path, changes, key):
    spec = CellSpec.from_config(cell_config(tmp_path, **changes), check=False)
    with pytest.raises(CellConfigError) as err:
        spec.check()
    assert err.value.key == key and not spec.checked
    good = CellSpec.from_config(cell_config(tmp_path), check=False)
    assert good.check() is good and good.checked and good.check() is good


def test_defaults_live_in_the_yaml_not_in_code():
    """`engine.attention` and patching's `noise_scale`/`margin` have one default: their YAML's."""
    import re

    root = Path(__file__).resolve().parents[1] / "mmflow"
    second_defaults = re.compile(
        r"""attention: str = "sdpa"|backend: str = "sdpa"|get\("attention", "sdpa"\)"""
        r"""|get\("(noise_scale|margin)", """
    )
    found = [
        f"{path.relative_to(root)}: {match.group(0)}"
        for path in sorted(root.rglob("*.py"))
        for match in second_defaults.finditer(path.read_text())
    ]
    assert not found, found
    assert second_defaults.search('def f(loaded, attention: str = "sdpa"):')  # the pattern can fail
    patching = OmegaConf.load(CONF_DIR / "analysis" / "patching.yaml")
    assert (patching.patching.noise_scale, patching.patching.margin) == (3.0, 0.05)
    for name in ("fast", "reference"):
        assert OmegaConf.load(CONF_DIR / "engine" / f"{name}.yaml").attention == "sdpa"


def test_patching_without_its_yaml_defaults_is_an_invalid_cell(tmp_path):
    patching = {"groups": ["image"], "noise_scale": 3.0, "noise_sd": None, "calibration_per_task": 4}
    config = cell_config(tmp_path, analysis="patching", corruption="noise", patching=patching)
    del config["knockout"]
    with pytest.raises(CellConfigError) as err:
        CellSpec.from_config(config)
    assert err.value.key == "patching.margin"
    assert CellSpec.from_config({**config, "patching": {**patching, "margin": 0.05}}).checked


def test_ids_and_batch_keys_see_contents_not_key_order_or_mapping_type(tmp_path):
    from mmflow.config.identity import batch_key

    config = cell_config(tmp_path)
    reordered = {**config, "model": dict(reversed(list(config["model"].items())))}
    spec, other = CellSpec.from_config(config), CellSpec.from_config(reordered)
    assert spec.id == other.id == cell_id(spec.plain) == cell_id(config)
    assert batch_key(spec.plain) == batch_key(other.plain) == batch_key(config)
    assert batch_key(spec.plain) != batch_key({**config, "task": "ChooseCat"})
