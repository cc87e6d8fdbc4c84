"""Issue 23, item 8: every ending the sweep driver sees is recorded in the cells, and a record's owner
is its pid *and* its process start time.

After Ctrl-C in a Ray sweep the killed actors never recorded their cells' ending: the cells stayed
`running`. A `sweep.json` left `running` by a driver whose pid the OS later gave to another process
stayed `running` forever.
"""

from __future__ import annotations

import json
import os
import socket

import pytest
from test_scheduler import Clock, FakeExecutor, cells

from mmflow.storage.locks import CellLock, mark_stale_sweeps, this_process
from mmflow.storage.store import CellStore
from mmflow.sweep import core
from mmflow.sweep.core import CellJob, Sweep
from mmflow.sweep.settings import SweepSettings


class InterruptedWorkers(FakeExecutor):
    """Workers that record their cells `running` (as `mmflow.execution.cell.start` does in a Ray
    actor), then the
    user presses Ctrl-C in the driver while they compute."""

    def __init__(self, clock, todo, hold=None) -> None:
        super().__init__(clock, batch=lambda ids, attempt: ("hang", 0, 0))
        self.todo, self.hold, self.polls = todo, hold, 0

    def submit(self, worker, batch, context):
        super().submit(worker, batch, context)
        for cell_id in batch.cell_ids:
            worker_run = {"host": "node-b", "pid": 4242, "since": "then", "attempt": 1}
            CellStore(self.todo[cell_id]["results_dir"], self.todo[cell_id]).write_meta(
                status="running", runs=[worker_run]
            )

    def poll(self, timeout_s):
        self.polls += 1
        if self.polls == 3:
            raise KeyboardInterrupt
        return super().poll(timeout_s)


def _sweep(tmp_path, todo, executor) -> Sweep:
    jobs = [CellJob.resolve(i, [f"task={c['task']}"], lambda c=c: c) for i, c in enumerate(todo.values())]
    sweep = Sweep("t", tmp_path / "sweep", jobs, SweepSettings(poll_s=1.0, report=False), executor=executor)
    sweep.publish = lambda: None
    return sweep


def test_ctrl_c_records_the_running_cells_as_interrupted(tmp_path) -> None:
    todo = cells(tmp_path, tasks=("ChooseAttr", "ChooseCat"))
    executor = InterruptedWorkers(Clock(), todo)
    sweep = _sweep(tmp_path, todo, executor)
    with pytest.raises(KeyboardInterrupt):
        sweep.run()
    started = [cell_id for _, ids, _ in executor.submitted for cell_id in ids]
    assert len(started) == 1  # one worker: the other cell's batch was still queued
    for cell_id in started:
        config = todo[cell_id]
        meta = CellStore(tmp_path, config).read_meta()
        assert meta["status"] == "interrupted", cell_id
        assert meta["error"] == "the sweep driver stopped (KeyboardInterrupt: KeyboardInterrupt)"
        assert meta["runs"][-1]["ended"].startswith("interrupted: the sweep driver stopped")
        assert not CellStore(tmp_path, config).is_done()
    record = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert record["status"] == "interrupted"
    expected = {cid: "interrupted" if cid in started else "pending" for cid in todo}
    assert {c["cell_id"]: c["status"] for c in record["cells"]} == expected


def test_a_cell_a_live_worker_still_holds_is_not_overwritten(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(core, "STOP_WAIT_S", 0.3)
    todo = cells(tmp_path, tasks=("ChooseAttr",))
    ((cell_id, config),) = todo.items()
    held = CellLock(tmp_path / cell_id)  # a worker that is still alive and writing
    assert held.acquire()
    try:
        sweep = _sweep(tmp_path, todo, InterruptedWorkers(Clock(), todo))
        with pytest.raises(KeyboardInterrupt):
            sweep.run()
        assert CellStore(tmp_path, config).read_meta()["status"] == "running"  # its own to record
    finally:
        held.release()
    record = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert [c["status"] for c in record["cells"]] == ["interrupted"]


def _left_running(folder, driver) -> None:
    folder.mkdir(parents=True)
    (folder / "sweep.json").write_text(json.dumps({"status": "running", "driver": driver}))


def test_a_reused_pid_does_not_keep_a_dead_drivers_record_running(tmp_path) -> None:
    me = this_process()
    assert isinstance(me["started_at"], float)
    host, pid = socket.gethostname(), os.getpid()  # a live pid, as a reused one would be
    _left_running(tmp_path / "reused", {"host": host, "pid": pid, "started_at": me["started_at"] - 3600})
    _left_running(tmp_path / "alive", me)
    _left_running(tmp_path / "old", {"host": host, "pid": pid})  # written before start times: by pid
    (tmp_path / "current").mkdir()
    marked = mark_stale_sweeps(tmp_path, tmp_path / "current")
    assert marked == [tmp_path / "reused" / "sweep.json"]
    record = json.loads(marked[0].read_text())
    assert record["status"] == "interrupted" and "another process" in record["stale"]
    for name in ("alive", "old"):
        assert json.loads((tmp_path / name / "sweep.json").read_text())["status"] == "running"


@pytest.mark.ray
@pytest.mark.slow
def test_ctrl_c_in_a_ray_sweep_records_the_running_cells(ray_cluster, tmp_path) -> None:
    """The issue's case through the public command: `launch.py -m` on a Ray cluster, then SIGINT."""
    import signal

    from test_faults_launch import cell_dirs, finish, start, wait_for

    results = tmp_path / "results"
    address = f"hydra.launcher.ray.init.address={ray_cluster.address}"
    proc = start(results, "-m", address, "hydra.launcher.progress=log", "n_samples=40", "window=1,3")
    wait_for(lambda: any(results.glob("*/parts/samples-*.parquet")), 300, "a finished sample", proc)
    proc.send_signal(signal.SIGINT)
    out = finish(proc)
    assert proc.returncode == 130, out[-3000:]
    cells = cell_dirs(results)
    assert len(cells) == 2  # one cell batch: both cells were running on the actor
    for cell in cells:
        meta = json.loads((cell / "cell.json").read_text())
        assert meta["status"] == "interrupted", out[-3000:]
        assert meta["runs"][-1]["ended"].startswith("interrupted: the sweep driver stopped")
    (record,) = [json.loads(p.read_text()) for p in results.glob("_hydra/sweeps/*/sweep.json")]
    assert record["status"] == "interrupted"
    assert {c["status"] for c in record["cells"]} == {"interrupted"}
