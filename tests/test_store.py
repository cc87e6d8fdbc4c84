"""Cell ids, atomic writes, and resume at sample granularity."""

from __future__ import annotations

import pandas as pd
import pytest

from mmflow.storage.store import CellStore, atomic_write_bytes, cell_id


def test_cell_id_is_stable_and_ignores_where_results_go():
    a = {"model": {"name": "m"}, "task": "ChooseAttr", "window": 3, "results_dir": "/x"}
    b = {"window": 3, "results_dir": "/elsewhere", "task": "ChooseAttr", "model": {"name": "m"}, "logger": {}}
    assert cell_id(a) == cell_id(b)
    assert cell_id(a) != cell_id({**a, "window": 5})
    with_resources = {**a, "model": {"name": "m", "resources": {"gpus": 2}}}
    assert cell_id(with_resources) == cell_id({**a, "model": {"name": "m", "resources": {"gpus": 1}}})
    assert len(cell_id(a)) == 16


def test_atomic_write_leaves_nothing_half_written(tmp_path):
    target = tmp_path / "f.bin"
    atomic_write_bytes(target, b"old")

    with pytest.raises(TypeError):
        atomic_write_bytes(target, object())  # type: ignore[arg-type]
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def _row(qid, order):
    return {"order": order, "question_id": qid, "status": "scored"}


def test_resume_merges_parts_without_duplicates(tmp_path):
    store = CellStore(tmp_path, {"task": "t", "results_dir": str(tmp_path)})
    store.write_sample(
        "q1", _row("q1", 0), [{"question_id": "q1", "layer": 0}, {"question_id": "q1", "layer": 1}]
    )
    # an interrupted sample: results part written, sample part not -> not done, and dropped at finish
    store.write_sample("q2", _row("q2", 1), [{"question_id": "q2", "layer": 0}])
    (
        store.parts
        / next(
            p.name
            for p in store.parts.glob("samples-*")
            if "q2" in pd.read_parquet(p)["question_id"].tolist()
        )
    ).unlink()
    assert store.done_question_ids() == {"q1"}
    # recomputing q2 overwrites its part instead of adding a second copy
    store.write_sample(
        "q2", _row("q2", 1), [{"question_id": "q2", "layer": 0}, {"question_id": "q2", "layer": 1}]
    )
    store.write_sample(
        "q1", _row("q1", 0), [{"question_id": "q1", "layer": 0}, {"question_id": "q1", "layer": 1}]
    )
    samples, results = store.finish(
        ["order", "question_id", "status"], ["question_id", "layer"], ["question_id", "layer"]
    )
    assert samples["question_id"].tolist() == ["q1", "q2"]
    assert results[["question_id", "layer"]].values.tolist() == [["q1", 0], ["q1", 1], ["q2", 0], ["q2", 1]]
    assert not store.is_done()  # files exist but the status is not "done" yet
    store.write_meta(status="done")
    assert store.is_done()
    store.clear_parts()
    assert not store.parts.exists()
