"""Issue 23, inputs that stall or escape: boxes a pixel or two outside the image, prompts longer than
the model's context, paths with `~` or variables, images of every PIL mode."""

from __future__ import annotations

from pathlib import Path

import pytest

from mmflow.data.gqa import BOX_TOLERANCE_PX, read_task_csv
from mmflow.data.sample import Box, Sample
from tests.test_data import QUERY_HEADER, query_row, write_csv

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
