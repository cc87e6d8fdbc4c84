"""Issue 23, inputs that stall or escape: boxes a pixel or two outside the image, prompts longer than
the model's context, paths with `~` or variables, images of every PIL mode."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
from test_data import QUERY_HEADER, query_row, write_csv
from test_faults import meta_of, table_config, write_table

from mmflow.data import read_table
from mmflow.data.gqa import BOX_TOLERANCE_PX, read_task_csv
from mmflow.data.sample import Box, Sample, Skip
from mmflow.prepare import PROMPT_TOO_LONG, prepare_or_skip
from mmflow.runtime import run_cells
from mmflow.validate import CellConfigError, validate_cell

# ------------------------------------------------------------------ boxes


def one_row(tmp_path: Path, row: dict[str, str]) -> Sample:
    path = write_csv(tmp_path / "q.csv", QUERY_HEADER, [row])
    (sample,) = read_task_csv(path, "QueryAttr", tmp_path, check_images=False)
    return sample


@pytest.mark.parametrize(
    ("xywh", "kept"),
    [
        ((-1, 5, 20, 30), Box(0, 5, 19, 30)),  # 1 px left of the image
        ((-2, 5, 20, 30), Box(0, 5, 18, 30)),
        ((10, -1, 20, 30), Box(10, 0, 20, 29)),  # 1 px above: was a box_outside_image skip
        ((10, -2, 20, 30), Box(10, 0, 20, 28)),
        ((50, 5, 15, 30), Box(50, 5, 14, 30)),  # 1 px past the right edge (64)
        ((10, 20, 20, 30), Box(10, 20, 20, 28)),  # 2 px past the bottom edge (48)
        ((-2, -2, 68, 52), Box(0, 0, 64, 48)),  # every edge at once
    ],
)
def test_boxes_within_tolerance_on_every_edge_are_clipped(tmp_path: Path, xywh, kept: Box) -> None:
    row = query_row(**{f"central object {k}": str(v) for k, v in zip("xywh", xywh, strict=True)})
    sample = one_row(tmp_path, row)
    assert isinstance(sample, Sample) and sample.box_issue is None
    assert sample.object_boxes == (kept,)


@pytest.mark.parametrize("xywh", [(-3, 5, 20, 30), (10, -3, 20, 30), (50, 5, 17, 30), (10, 20, 20, 31)])
def test_boxes_beyond_tolerance_are_skipped_with_the_reason(tmp_path: Path, xywh) -> None:
    assert BOX_TOLERANCE_PX == 2
    row = query_row(**{f"central object {k}": str(v) for k, v in zip("xywh", xywh, strict=True)})
    sample = one_row(tmp_path, row)
    assert sample.object_boxes == () and sample.box_issue[0] == "box_outside_image"
    assert "tolerance 2 px" in sample.box_issue[1]


# ------------------------------------------------------------------ prompts longer than the context


def test_a_question_longer_than_the_models_positions_is_skipped_before_the_model(tiny_llava, tmp_path):
    positions = tiny_llava.model.config.text_config.max_position_embeddings  # 8192
    long = "Is the jar " + "very " * positions + "full or empty?"  # one token per word at least
    (sample,) = read_table(
        write_table(tmp_path, [("000000", long, "empty", "full")]), "ChooseAttr", tmp_path / "images"
    )

    skip = prepare_or_skip(tiny_llava, sample, new_tokens=8)
    assert isinstance(skip, Skip) and skip.reason == PROMPT_TOO_LONG, skip
    assert f"exceed the model's {positions} positions" in skip.detail
    fits = prepare_or_skip(tiny_llava, replace(sample, question="Is the jar full or empty?"), new_tokens=8)
    assert not isinstance(fits, Skip)


def test_a_configured_max_tokens_skips_longer_samples_and_keeps_the_rest(tiny_llava, tmp_path):
    longer = "Is the jar " + "quite " * 60 + "full or empty?"  # 751 tokens with the image's, the other 631
    rows = [("000000", "Is the jar full or empty?", "empty", "full"), ("000001", longer, "empty", "full")]
    config = table_config(tmp_path, write_table(tmp_path, rows))
    config["model"] = {**config["model"], "max_tokens": 700}
    (outcome,) = run_cells(tiny_llava, [config])
    meta = meta_of(outcome)
    assert outcome.status == "done" and meta["counts"]["skipped"] == {PROMPT_TOO_LONG: 1}
    samples = pd.read_parquet(outcome.path + "/samples.parquet").set_index("question_id")
    assert samples.loc["000000", "status"] != "skipped"
    assert "model.max_tokens=700" in samples.loc["000001", "skip_detail"]
    with pytest.raises(CellConfigError, match="model.max_tokens"):
        validate_cell({**config, "model": {**config["model"], "max_tokens": 0}})
