"""Data sources and engines are registered like analyses: a new one is one module (plus one YAML for a
data source), and the config checks, the runtime and the cell id find it through the registry."""

from __future__ import annotations

import pytest
from conftest import cell_config

from mmflow.config.identity import cell_id
from mmflow.config.spec import CellSpec
from mmflow.config.validate import validate_cell
from mmflow.data import sources
from mmflow.data.sample import Skip
from mmflow.errors import CellConfigError
from mmflow.execution.runtime import load_samples
from mmflow.knockout import engines, make_engine


def test_the_shipped_sources_and_engines_are_registered():
    assert sources.known_sources() == ["gqa", "shapes", "table"]
    assert [sources.data_source(n).name for n in ("gqa", "shapes", "table")] == ["gqa", "shapes", "table"]
    assert engines.engine_names() == ("fast", "reference")
    with pytest.raises(ValueError, match="unknown data source 'gqa2'; known: gqa, shapes, table"):
        sources.data_source("gqa2")
    with pytest.raises(ValueError, match="unknown engine 'fastest'; known: fast, reference"):
        make_engine("fastest", None, "sdpa")  # type: ignore[arg-type]


@pytest.fixture
def counting_source():
    """A data source registered from outside mmflow: three skipped rows, and an identity rule."""

    @sources.register_source
    class Counting(sources.DataSource):
        name = "counting_test"

        @classmethod
        def load(cls, data, task, n_samples):
            return [Skip(f"{task}-{i}", "no_image", str(data["start"] + i)) for i in range(n_samples)]

        @classmethod
        def validate(cls, data):
            if not isinstance(data.get("start"), int):
                raise CellConfigError("data.start", data.get("start"), "must be an integer")

        @classmethod
        def identity(cls, data):
            return {k: v for k, v in data.items() if k != "label"}

    yield Counting
    del sources._SOURCES["counting_test"]


def test_a_registered_source_is_validated_loaded_and_identified(tmp_path, counting_source):
    config = cell_config(tmp_path, data={"name": "counting_test", "start": 5}, n_samples=3)
    validate_cell(config)
    with pytest.raises(CellConfigError) as err:
        validate_cell(cell_config(tmp_path, data={"name": "counting_test", "start": "5"}))
    assert err.value.key == "data.start"
    spec = CellSpec.from_config(config)
    assert [s.detail for s in load_samples(spec)] == ["5", "6", "7"]
    assert [s.question_id for s in load_samples(config)] == ["ChooseAttr-0", "ChooseAttr-1", "ChooseAttr-2"]
    labelled = {**config, "data": {**config["data"], "label": "mine"}}
    assert cell_id(labelled) == cell_id(config) == spec.id
    assert cell_id({**config, "data": {**config["data"], "start": 6}}) != spec.id


def test_a_registered_engine_is_a_choice_and_is_made_with_the_configured_attention(tmp_path):
    made = []

    @engines.register_engine("recording_test")
    def recording(loaded, attention):
        made.append((loaded, attention))
        return "engine"

    try:
        validate_cell(cell_config(tmp_path, engine={"name": "recording_test", "attention": "eager"}))
        assert make_engine("recording_test", "loaded", "eager") == "engine"  # type: ignore[arg-type]
        assert made == [("loaded", "eager")]
    finally:
        del engines._ENGINES["recording_test"]
    with pytest.raises(CellConfigError) as err:
        validate_cell(cell_config(tmp_path, engine={"name": "recording_test", "attention": "eager"}))
    assert err.value.key == "engine.name"
