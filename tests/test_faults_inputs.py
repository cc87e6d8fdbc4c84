"""Issue 23, inputs that stall or escape: boxes a pixel or two outside the image, prompts longer than
the model's context, paths with `~` or variables, images of every PIL mode."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
from test_data import QUERY_HEADER, query_row, write_csv
from test_faults import meta_of, table_config, write_table

from mmflow.cli import refuse_env_interpolation
from mmflow.config.paths import expand_path
from mmflow.config.validate import CellConfigError, validate_cell
from mmflow.data import load_table, read_table, resolve_data
from mmflow.data.gqa import BOX_TOLERANCE_PX, read_task_csv
from mmflow.data.sample import Box, Sample, Skip
from mmflow.errors import ConfigError, PathConfigError
from mmflow.execution.prepare import PROMPT_TOO_LONG, prepare_or_skip
from mmflow.execution.runtime import run_cells
from mmflow.models.registry import resolve_checkpoint
from mmflow.storage.locks import exclusive_dir
from mmflow.wandb_logger.settings import run_root

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS_1 = [("000000", "Is the jar full or empty?", "empty", "full")]

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


# ------------------------------------------------------------------ paths


def test_path_keys_expand_home_and_variables_or_refuse_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("MMF_ROOT", str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MMF_UNSET", raising=False)
    assert expand_path("$MMF_ROOT/r", "results_dir") == f"{tmp_path}/r"
    assert expand_path("${MMF_ROOT}/r", "results_dir") == f"{tmp_path}/r"
    assert expand_path("~/r", "results_dir") == f"{tmp_path}/home/r"
    with pytest.raises(
        PathConfigError, match=r"^data.image_dir='\$MMF_UNSET/img': environment variable MMF_UNSET"
    ):
        expand_path("$MMF_UNSET/img", "data.image_dir")
    assert exclusive_dir("$MMF_ROOT/res/_hydra/runs/now") == f"{tmp_path}/res/_hydra/runs/now"
    with pytest.raises(ConfigError) as refused:
        exclusive_dir("${MMF_UNSET}/res/_hydra/runs/now")
    assert "MMF_UNSET is not set" in refused.value.message and "\n" not in refused.value.message
    assert not list(Path.cwd().glob("$*")) and not list(tmp_path.glob("$*"))

    table = write_table(tmp_path / "t", QUESTIONS_1)
    data = resolve_data({"name": "table", "path": "$MMF_ROOT/t/vqa.csv", "image_dir": "~/../t/images"})
    assert data["path"] == str(table) and data["image_dir"] == str(table.parent / "images")
    assert Path(resolve_checkpoint("$MMF_ROOT/ckpt")) == tmp_path / "ckpt"
    assert run_root({"dir": "~/wb"}, tmp_path) == tmp_path / "home" / "wb"


def test_table_rows_of_no_known_task_are_recorded_not_dropped(tmp_path):
    """A misspelt task goes to the cell of the task it resembles, an empty one to every cell: both as
    `unknown_task` skips naming the row (they had vanished from every cell)."""
    table = write_table(tmp_path, QUESTIONS_1, task="ChooseAttr")
    frame = pd.read_csv(table, dtype=str)
    frame = pd.concat([frame] * 4, ignore_index=True)
    frame["question_id"] = ["a", "b", "c", "d"]
    frame["task"] = ["ChooseAttr", "ChoseAttr", "", "QueryAttr"]
    frame.to_csv(table, index=False)
    data = resolve_data({"name": "table", "path": str(table), "image_dir": str(tmp_path / "images")})
    rows = load_table(data, "ChooseAttr")
    assert [r.question_id for r in rows] == ["a", "b", "c"]  # d is QueryAttr's
    assert isinstance(rows[0], Sample) and [r.reason for r in rows[1:]] == ["unknown_task"] * 2
    assert (
        rows[1].detail == "vqa.csv data row 2: task 'ChoseAttr' is none of the six; did you mean ChooseAttr?"
    )
    assert rows[2].detail.startswith("vqa.csv data row 3: task '' is none of the six; tasks: ChooseAttr, ")
    (empty,) = load_table(data, "CompareAttr")  # an empty task: in every task's cell
    assert empty.question_id == "c" and empty.reason == "unknown_task"


def test_table_images_stay_inside_the_image_folder_unless_allowed(tmp_path):
    table = write_table(tmp_path, QUESTIONS_1)
    outside = tmp_path / "elsewhere.jpg"
    shutil.copy(tmp_path / "images" / "img000000.jpg", outside)
    frame = pd.read_csv(table, dtype=str)
    frame = pd.concat([frame] * 3, ignore_index=True)
    frame["question_id"] = ["a", "b", "c"]
    frame["image"] = ["img000000.jpg", "../elsewhere.jpg", str(outside)]
    frame.to_csv(table, index=False)
    data = resolve_data({"name": "table", "path": str(table), "image_dir": str(tmp_path / "images")})
    rows = load_table(data, "ChooseAttr")
    assert isinstance(rows[0], Sample)
    assert [r.reason for r in rows[1:]] == ["image_outside_image_dir"] * 2
    assert "+data.allow_images_outside=true" in rows[1].detail  # the spelling Hydra accepts
    allowed = load_table({**data, "allow_images_outside": True}, "ChooseAttr")
    assert all(isinstance(r, Sample) for r in allowed) and allowed[1].image_path.resolve() == outside


@pytest.mark.slow
def test_launch_expands_results_dir_variables_and_refuses_unset_ones(tmp_path):
    env = {**os.environ, "MMF_RES": str(tmp_path), "PYTHONPATH": str(ROOT)}
    env.pop("MMF_UNSET", None)
    base = [sys.executable, "launch.py", "model=tiny-llava", "n_samples=1", "logger=none"]
    run = subprocess.run(
        [*base, "results_dir=$MMF_RES/res"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=400
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert len(list((tmp_path / "res").glob("*/cell.json"))) == 1
    assert not list(ROOT.glob("$*"))  # no folder named `$MMF_RES`
    refused = subprocess.run(
        [*base, "results_dir=$MMF_UNSET/res"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=400
    )
    assert refused.returncode == 2 and not list(ROOT.glob("$*"))
    assert refused.stderr.strip().splitlines()[-1] == (
        "[mmflow] error: results_dir='$MMF_UNSET/res': environment variable MMF_UNSET is not set "
        "(export it, or write the path out)"
    )


def test_a_braced_variable_on_the_command_line_is_refused_in_one_line():
    """`results_dir='${HOME}/x'` is Hydra's interpolation of a key HOME: Hydra failed with a traceback."""
    with pytest.raises(ConfigError) as refused:
        refuse_env_interpolation("results_dir=${MMF_RES}/x")
    assert refused.value.message == (
        "results_dir: ${MMF_RES} is Hydra's interpolation of a config key, and there is no key MMF_RES; "
        "for the environment variable write $MMF_RES or ${oc.env:MMF_RES}"
    )
    for fine in (
        "results_dir=$MMF_RES/x",
        "results_dir=${oc.env:MMF_RES}/x",
        "window=${model.default_window}",
    ):
        refuse_env_interpolation(fine)
