"""A `data=table` cell's id follows the bytes of its file, not the path it was given.

The trial's case: editing an answer in `vqa.csv` gave `cached`, and another folder's different
`vqa.csv` (same relative `data.path`) got the first file's results. Now the resolved config records
the absolute path and `data.sha256`; the digest (not the path) is in the id.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import cell_config
from hydra import compose, initialize_config_dir
from PIL import Image

from mmflow.config.dirs import CONF_DIR
from mmflow.data import DataError, resolve_data
from mmflow.execution.cell import Cell, start
from mmflow.execution.runtime import run_cells
from mmflow.storage.store import cell_id

ROWS = [
    ("q1", "Is the jar full or empty?", "empty", "full"),
    ("q2", "Is the cup red or blue?", "red", "blue"),
]


def write_table(folder: Path, rows=ROWS, images: Path | None = None) -> Path:
    """`folder/vqa.csv` (the README's column names `qid`, `file`) and its noise images."""
    images = images or folder / "imgs"
    images.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    records = []
    for qid, question, true, false in rows:
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(images / f"{qid}.jpg")
        objects = json.dumps([{"name": "jar", "box": [4, 4, 30, 30]}])
        records.append(
            {"qid": qid, "file": f"{qid}.jpg", "question": question, "answer": true, "true_option": true}
            | {"false_option": false, "image_w": 64, "image_h": 48, "objects": objects}
        )
    folder.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(records).to_csv(folder / "vqa.csv", index=False)
    return folder / "vqa.csv"


def run_config(results: Path) -> dict:
    """`mmflow run data=table data.path=vqa.csv data.image_dir=imgs ...`, resolved in the working dir."""
    overrides = [
        "model=tiny-llava",
        "data=table",
        "data.path=vqa.csv",
        "data.image_dir=imgs",
        "task=ChooseAttr",
        "data.columns={qid: question_id, file: image}",
        "n_samples=8",
        f"results_dir={results}",
        "logger=none",
    ]
    from mmflow.cli import cell_config as resolve

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return resolve(compose("config", overrides=overrides))


def test_relative_paths_resolve_in_the_working_directory_and_the_digest_is_the_id(tmp_path, monkeypatch):
    one, two = tmp_path / "one", tmp_path / "two"
    write_table(one)
    write_table(two, ROWS[:1])  # another file, same relative data.path
    monkeypatch.chdir(one)
    a = run_config(tmp_path / "results")
    monkeypatch.chdir(two)
    b = run_config(tmp_path / "results")
    assert a["data"]["path"] == str(one / "vqa.csv") and a["data"]["image_dir"] == str(one / "imgs")
    assert b["data"]["path"] == str(two / "vqa.csv") and a["data"]["format"] == "csv"
    assert len(a["data"]["sha256"]) == 64 and a["data"]["sha256"] != b["data"]["sha256"]
    assert cell_id(a) != cell_id(b)


def test_same_bytes_at_two_paths_are_one_cell(tmp_path):
    table = write_table(tmp_path / "a")
    copy = tmp_path / "b" / "renamed.csv"
    copy.parent.mkdir()
    copy.write_bytes(table.read_bytes())
    images = str(tmp_path / "a" / "imgs")
    a = resolve_data({"name": "table", "path": str(table), "image_dir": images})
    b = resolve_data({"name": "table", "path": "renamed.csv", "image_dir": images}, base=copy.parent)
    assert a["path"] != b["path"] and a["sha256"] == b["sha256"]
    config = cell_config(tmp_path)
    assert cell_id({**config, "data": a}) == cell_id({**config, "data": b})
    with pytest.raises(ValueError, match="data.sha256"):  # never an id without the digest
        cell_id({**config, "data": {k: v for k, v in a.items() if k != "sha256"}})
    with pytest.raises(DataError, match="not found"):
        resolve_data({**a, "path": "missing.csv"}, base=tmp_path)


def test_gqa_and_shapes_configs_are_unchanged():
    gqa, shapes = {"name": "gqa", "image_dir": "rel/images"}, {"name": "shapes", "seed": 0, "cache_dir": None}
    for data in (gqa, shapes):
        assert resolve_data(data, base="/elsewhere") == data


def table_cell(tmp_path: Path, table: Path) -> dict:
    data = resolve_data({"name": "table", "path": str(table), "image_dir": str(table.parent / "imgs")})
    data["columns"] = {"qid": "question_id", "file": "image"}
    return cell_config(tmp_path / "results", data=data, n_samples=8)


@pytest.mark.slow
def test_a_changed_answer_is_a_new_cell_computed_again(tiny_llava, tmp_path):
    table = write_table(tmp_path)
    first = run_cells(tiny_llava, [table_cell(tmp_path, table)])[0]
    assert first.status == "done"
    meta = json.loads((Path(first.path) / "cell.json").read_text())
    assert meta["config"]["data"]["sha256"] == resolve_data(table_cell(tmp_path, table)["data"])["sha256"]
    assert meta["config"]["data"]["path"] == str(table)

    frame = pd.read_csv(table, dtype=str)
    frame.loc[0, ["answer", "true_option", "false_option"]] = ["full", "full", "empty"]
    frame.to_csv(table, index=False)
    again = run_cells(tiny_llava, [table_cell(tmp_path, table)])[0]
    assert again.status == "done" and again.cell_id != first.cell_id  # computed, not `cached`
    samples = pd.read_parquet(Path(again.path) / "samples.parquet").set_index("question_id")
    assert samples.loc["q1", "answer"] == "full"


def test_a_file_changed_after_resolving_never_joins_the_cell(tiny_llava, tmp_path):
    table = write_table(tmp_path)
    config = table_cell(tmp_path, table)
    table.write_text(table.read_text().replace("empty", "full", 1))
    outcome = run_cells(tiny_llava, [config])[0]
    assert outcome.status == "failed" and "changed since this cell was resolved" in outcome.error
    assert not list(Path(outcome.path).glob("parts/samples-*.parquet"))


def test_parts_of_other_contents_are_not_resumed(tiny_llava, tmp_path):
    config = table_cell(tmp_path, write_table(tmp_path))
    cell = Cell(config, tiny_llava)
    other = {**config, "data": {**config["data"], "sha256": "0" * 64}}
    cell.store.write_meta(status="running")
    (cell.store.dir / "cell.json").write_text(json.dumps({"status": "running", "config": other}))
    cell.store.write_sample("q1", {"question_id": "q1", "order": 0}, [])
    start(cell, tiny_llava, {})
    assert cell.done_ids == set() and list((cell.store.dir / "damaged").glob("samples-*"))
