"""`mmflow.storage.relay` without Ray: an actor's cell-store writes replayed by the driver, in order,
bounded."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from mmflow.storage.locks import CellLock
from mmflow.storage.relay import Relay, relaying, safe_name
from mmflow.storage.store import CellStore
from mmflow.sweep.inbox import DriverBatch

KEYS = ["question_id", "layer"]


def row(order: int, qid: str) -> dict:
    return {"order": order, "question_id": qid, "status": "scored"}


def results(qid: str) -> list[dict]:
    return [{"question_id": qid, "layer": layer, "value": float(layer)} for layer in range(3)]


def files(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in folder.rglob("*")
        if p.is_file() and not p.name.startswith(".lock")
    }


def test_an_actor_resumes_from_the_driver_parts_and_its_writes_land_byte_for_byte(tmp_path: Path) -> None:
    results_dir = tmp_path / "results"
    config = {"task": "ChooseAttr", "n_samples": 3, "results_dir": str(results_dir)}
    earlier = CellStore(results_dir, config)  # an interrupted run recorded q1 on the driver
    earlier.write_sample("q1", row(0, "q1"), results("q1"))
    earlier.write_meta(status="running")

    batch = DriverBatch.open([config])
    cell = earlier.id
    assert [c["results_dir"] for c in batch.configs] == [str(results_dir)] and batch.outcomes == []
    assert sorted(batch.seeds[cell]) == sorted(files(earlier.dir))  # cell.json and both parts
    assert not CellLock(earlier.dir).acquire(0.0)  # the driver holds the cell while the batch runs

    relay = Relay(tmp_path / "scratch", limit=2)
    with relaying(relay, batch.seeds):
        store = CellStore(results_dir, config)
        assert store.dir == tmp_path / "scratch" / cell
        assert store.done_question_ids() == {"q1"}  # the resume point comes from the driver

        def work() -> None:
            store.write_meta(status="running", runs=[{"pid": 1}])
            for order, qid in ((1, "q2"), (2, "q3")):
                store.write_sample(qid, row(order, qid), results(qid))

        writer = threading.Thread(target=work)
        writer.start()
        time.sleep(0.3)
        assert writer.is_alive() and relay.queue.qsize() == 2  # full: the writer waits for the driver
        while writer.is_alive() or relay.queue.qsize():
            batch.apply(relay.take(0.05, 1))
        writer.join()
        samples, merged = store.finish(["order", "question_id", "status"], [*KEYS, "value"], KEYS)
        batch.apply(relay.take(0, 100))  # two final files: the queue is full again
        store.clear_parts()
        batch.apply(relay.take(0, 100))
        assert list(samples["question_id"]) == ["q1", "q2", "q3"] and len(merged) == 9
        assert files(earlier.dir) == files(store.dir)  # the driver's folder is the actor's, byte for byte
    assert not (tmp_path / "scratch").exists()  # nothing stays on the worker
    assert not earlier.parts.exists()
    assert pd.read_parquet(earlier.dir / "results.parquet")["question_id"].tolist().count("q1") == 3
    assert batch.ops == 1 + 2 * 2 + 2 + 1 and batch.bytes > 0
    batch.close()
    assert CellLock(earlier.dir).acquire(0.0)


def test_a_finished_cell_is_settled_by_the_driver_and_never_sent(tmp_path: Path) -> None:
    config = {"task": "ChooseAttr", "n_samples": 1, "results_dir": str(tmp_path)}
    store = CellStore(tmp_path, config)
    store.write_sample("q1", row(0, "q1"), results("q1"))
    store.finish(["order", "question_id", "status"], [*KEYS, "value"], KEYS)
    store.clear_parts()
    store.write_meta(status="done", rows={"samples.parquet": 1, "results.parquet": 3})
    batch = DriverBatch.open([config])
    assert batch.configs == [] and batch.seeds == {}
    assert batch.outcomes == [
        {"cell_id": store.id, "status": "cached", "path": str(store.dir), "error": None, "summary": {}}
    ]
    assert CellLock(store.dir).acquire(0.0)  # released at once


@pytest.mark.parametrize("name", ["../other/cell.json", "/etc/passwd", "parts/../../x", ""])
def test_a_relayed_path_outside_its_cell_folder_is_refused(name: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="outside its cell folder"):
        safe_name(name)
    batch = DriverBatch({"c": tmp_path / "c"}, [], {}, [])
    with pytest.raises(ValueError, match="outside its cell folder"):
        batch.apply([("write", "c", name, b"x")])
    assert not any(tmp_path.rglob("*x"))
