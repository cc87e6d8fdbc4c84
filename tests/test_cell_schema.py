"""Issue 23, item 9: every file of a cell has its analysis's schema, empty or not.

A cell without a scored sample used to write `results.parquet` with every column typed null, so a
folder of cells did not read as one dataset (`ArrowNotImplementedError`) and `pd.concat` made every
column `object`.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from conftest import cell_config

from mmflow.analyses import analysis_for
from mmflow.execution.cell import SAMPLE_COLUMNS
from mmflow.execution.runtime import run_cells
from mmflow.storage.schema import SAMPLE_TYPES, arrow_schema

ANALYSES = {
    "knockout": {},
    "answer_tracking": {"analysis": "answer_tracking", "lens": "norm"},
    "patching": {
        "analysis": "patching",
        "corruption": "noise",
        "patching": {"groups": ["image"], "noise_scale": 3.0, "margin": 0.0},
    },
}


def _run(tiny_llava, folder, analysis: str, **changes):
    config = cell_config(folder, n_samples=1, **{**ANALYSES[analysis], **changes})
    if analysis == "answer_tracking":
        config.pop("knockout"), config.pop("window")
    outcome = run_cells(tiny_llava, [config])[0]
    assert outcome.status == "done", outcome.error
    return config, folder / outcome.cell_id


@pytest.mark.parametrize("analysis", sorted(ANALYSES))
def test_an_empty_cell_has_the_schema_of_a_full_one(tiny_llava, tmp_path, analysis) -> None:
    images = tmp_path / "images"  # empty: every GQA image is missing, nothing is scored
    images.mkdir()
    nothing = {"data": {"name": "gqa", "image_dir": str(images)}, "task": "QueryAttr"}
    if analysis == "patching":  # a margin no corruption reaches: every sample corruption_too_weak
        nothing = {"patching": {**ANALYSES["patching"]["patching"], "margin": 1.0}}
    config, empty = _run(tiny_llava, tmp_path, analysis, **nothing)
    _, full = _run(tiny_llava, tmp_path, analysis)
    expected = analysis_for(config).result_schema
    assert pq.read_schema(empty / "results.parquet") == expected
    assert pq.read_schema(full / "results.parquet") == expected
    assert pq.read_table(empty / "results.parquet").num_rows == 0
    assert pq.read_table(full / "results.parquet").num_rows > 0
    samples = arrow_schema(SAMPLE_COLUMNS, SAMPLE_TYPES)
    assert pq.read_schema(empty / "samples.parquet") == samples
    assert pq.read_schema(full / "samples.parquet") == samples
    # a folder of cells reads as one dataset, and a concat keeps the types
    table = ds.dataset([str(empty / "results.parquet"), str(full / "results.parquet")]).to_table()
    assert table.schema == expected
    frames = [pd.read_parquet(p / "results.parquet") for p in (empty, full)]
    merged = pd.concat(frames, ignore_index=True)
    assert merged["layer"].dtype == "int64"
    assert not any(merged[c].dtype == object and c.startswith("p_") for c in merged)


def test_every_result_column_has_a_declared_type() -> None:
    for name, changes in ANALYSES.items():
        config = cell_config(Path("."), **changes)
        assert analysis_for(config).result_schema.names == analysis_for(config).result_columns, name
    for heads in ("each", [0, 1]):
        config = cell_config(Path("."))
        config["knockout"] = {**config["knockout"], "heads": heads}
        assert len(analysis_for(config).result_schema) == len(analysis_for(config).result_columns)
