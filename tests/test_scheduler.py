"""The sweep scheduler's retries and timeouts, fast: a scripted executor and a fake clock, no Ray.

The fake executor plays what a Ray cluster can do to a worker (placed or not, lost mid-batch, a batch
that raises, hangs or stops finishing samples); the clock advances by each poll's timeout, so a 12 h
cell-batch timeout takes no real time. The Ray integration tests (test_launcher.py) run the same
scheduler on real actors.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

from mmflow.execution.context import RunContext
from mmflow.storage.store import CellStore, atomic_write_parquet
from mmflow.sweep.core import CellJob, Sweep
from mmflow.sweep.executor import Event
from mmflow.sweep.plan import plan_models
from mmflow.sweep.scheduler import Scheduler
from mmflow.sweep.settings import SweepSettings


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeExecutor:
    """Workers whose fate is scripted per batch attempt.

    `batch(cell_ids, attempt) -> (kind, polls, progress)`: after `polls` polls the batch ends with
    `kind` (finished | batch_failed | lost | hang); `progress` is what `progress()` reports.
    `start(worker) -> ready | fail | never`.
    """

    def __init__(self, clock: Clock, batch=None, start=None, unplaceable=None) -> None:
        self.clock = clock
        self.batch_script = batch or (lambda cell_ids, attempt: ("finished", 1, 1))
        self.start_script = start or (lambda worker: "ready")
        self.unplaceable = unplaceable or {}
        self.pending: dict[str, list] = {}  # worker -> [event, polls left]
        self.progress_of: dict[str, int] = {}
        self.started: list[str] = []
        self.cancelled: list[str] = []
        self.submitted: list[tuple[str, list[str], RunContext]] = []

    def prepare(self, plans):
        return {p.key: self.unplaceable[p.name] for p in plans if p.name in self.unplaceable}

    def start(self, worker, plan):
        self.started.append(worker)
        fate = self.start_script(worker)
        if fate == "ready":
            self.pending[worker] = [Event(worker, "ready", info={"node_id": "node-a"}), 0]
        elif fate == "fail":
            self.pending[worker] = [Event(worker, "start_failed", error="actor died in __init__"), 0]

    def submit(self, worker, batch, context):
        self.submitted.append((worker, list(batch.cell_ids), context))
        kind, polls, progress = self.batch_script(batch.cell_ids, batch.attempt)
        self.progress_of[worker] = progress
        outcomes = [{"cell_id": c, "status": "done", "error": None} for c in batch.cell_ids]
        event = {
            "finished": Event(worker, "finished", outcomes=outcomes),
            "batch_failed": Event(worker, "batch_failed", error="ValueError: unknown task 'NoSuchTask'"),
            "lost": Event(worker, "lost", error="the actor died unexpectedly"),
        }.get(kind)
        if event is not None:
            self.pending[worker] = [event, polls]

    def poll(self, timeout_s):
        self.clock.now += timeout_s
        events = []
        for worker, entry in list(self.pending.items()):
            if entry[1] <= 0:
                events.append(entry[0])
                del self.pending[worker]
            else:
                entry[1] -= 1
        return events

    def progress(self, worker):
        return self.progress_of.get(worker)

    def cancel(self, worker):
        self.cancelled.append(worker)
        self.pending.pop(worker, None)

    def free_resources(self):
        return "{'CPU': 0.0}"


def cells(tmp_path: Path, model: str = "m1", tasks=("A",), windows=(1,)) -> dict[str, dict]:
    """Cell configs (cell id -> config); cells of one task share samples: one batch per task."""
    out = {}
    for task in tasks:
        for window in windows:
            config = {  # a valid cell (a sweep validates each cell), never computed here
                "model": {"name": model},
                "task": task,
                "data": {"name": "shapes", "seed": 0},
                "engine": {"name": "fast", "attention": "sdpa"},
                "require_correct": False,
                "analysis": "knockout",
                "max_new_tokens": 2,
                "n_samples": 4,
                "window": window,
                "knockout": {"name": "image_to_question", "source": "image", "target": "question"},
                "results_dir": str(tmp_path),
            }
            out[CellStore(tmp_path, config).id] = config
    return out


def run(tmp_path, todo, executor, clock, **settings):
    settings = SweepSettings(poll_s=1.0, **settings)
    records: list[tuple[str, str, str | None]] = []
    context = RunContext(sweep_name="t", sweep_dir=str(tmp_path))
    scheduler = Scheduler(
        settings,
        plan_models(todo, settings),
        executor,
        lambda *r: records.append(r),
        context,
        clock=clock,
    )
    scheduler.run()
    final = {}
    for cell_id, status, error in records:
        final[cell_id] = (status, error)
    return final, records, scheduler


def test_a_lost_worker_requeues_its_batch_on_a_fresh_worker(tmp_path, caplog) -> None:
    clock, todo = Clock(), cells(tmp_path, tasks=("A", "B"))
    script = lambda ids, attempt: ("lost", 2, 1) if attempt == 1 else ("finished", 1, 1)  # noqa: E731
    executor = FakeExecutor(clock, batch=script)
    with caplog.at_level(logging.WARNING):
        final, records, _ = run(tmp_path, todo, executor, clock)
    assert {s for s, _ in final.values()} == {"done"}
    # batch A: attempt 1 lost on m1#1, attempt 2 on a fresh worker; batch B likewise
    attempts = [(w, ids, c.attempt) for w, ids, c in executor.submitted]
    assert [a for _, _, a in attempts] == [1, 2, 1, 2]
    assert attempts[0][0] != attempts[1][0] and attempts[0][1] == attempts[1][1]
    assert executor.started == ["m1#1", "m1#2", "m1#3"] and set(executor.cancelled) >= {"m1#1", "m1#2"}
    first = next(iter(todo))
    assert [s for c, s, _ in records if c == first] == ["running", "pending", "running", "done"]
    assert "died" in caplog.text and "requeueing 1 cell(s) (attempt 1 done)" in caplog.text
    assert all(c.sweep_name == "t" for _, _, c in executor.submitted)


def test_a_batch_that_raises_fails_its_cells_only_and_the_worker_goes_on(tmp_path) -> None:
    clock, todo = Clock(), cells(tmp_path, tasks=("A", "NoSuchTask"), windows=(1, 3))

    def script(ids, attempt):
        return ("finished", 0, 2) if todo[ids[0]]["task"] == "A" else ("batch_failed", 0, 0)

    executor = FakeExecutor(clock, batch=script)
    final, _, _ = run(tmp_path, todo, executor, clock)
    by_task = {todo[c]["task"]: s for c, (s, _) in final.items()}
    assert by_task == {"A": "done", "NoSuchTask": "failed"}
    assert executor.started == ["m1#1"]  # one worker ran both batches: raising is not a dead worker
    for cell_id, config in todo.items():
        if config["task"] == "NoSuchTask":
            meta = CellStore(tmp_path, config).read_meta()
            assert meta["status"] == "failed" and "unknown task 'NoSuchTask'" in meta["error"]
            assert meta["attempt"] == 1 and meta["sweep_name"] == "t"
            assert "unknown task" in final[cell_id][1]


def test_a_batch_that_runs_too_long_is_retried_then_fails(tmp_path) -> None:
    clock, todo = Clock(), cells(tmp_path)
    executor = FakeExecutor(clock, batch=lambda ids, attempt: ("hang", 0, attempt))  # progress moves
    start = clock.now
    final, _, _ = run(tmp_path, todo, executor, clock, batch_timeout_s=30, batch_retries=2)
    ((status, error),) = final.values()
    assert (
        status == "failed"
        and "gave up after 3 attempt(s)" in error
        and "cell batch timed out after 30 s" in error
    )
    assert [c.attempt for _, _, c in executor.submitted] == [1, 2, 3]
    assert len(executor.started) == 3  # each retry on a fresh worker
    assert 90 <= clock.now - start <= 100  # three 30 s attempts, then it stops
    meta = CellStore(tmp_path, next(iter(todo.values()))).read_meta()
    assert meta["status"] == "failed" and meta["attempt"] == 3


def test_a_worker_that_stops_finishing_samples_is_replaced(tmp_path) -> None:
    clock, todo = Clock(), cells(tmp_path)
    # attempt 1 hangs with no progress; attempt 2 finishes
    script = lambda ids, attempt: ("hang", 0, 0) if attempt == 1 else ("finished", 3, 2)  # noqa: E731
    executor = FakeExecutor(clock, batch=script)
    final, _, _ = run(tmp_path, todo, executor, clock, stall_timeout_s=20)
    assert [s for s, _ in final.values()] == ["done"]
    assert [c.attempt for _, _, c in executor.submitted] == [1, 2]
    assert executor.cancelled[0] == "m1#1"


def test_a_worker_that_cannot_be_placed_fails_its_cells_after_the_start_timeout(tmp_path) -> None:
    clock, todo = Clock(), cells(tmp_path, tasks=("A", "B"))
    executor = FakeExecutor(clock, start=lambda worker: "never")
    final, _, _ = run(tmp_path, todo, executor, clock, start_timeout_s=15)
    assert {s for s, _ in final.values()} == {"failed"}
    error = next(iter(final.values()))[1]
    assert "no actor for m1 could be placed within 15 s" in error and "free: {'CPU': 0.0}" in error
    assert executor.submitted == [] and clock.now - 1000 <= 20


def test_workers_that_fail_to_start_are_retried_then_their_model_fails(tmp_path) -> None:
    clock, todo = Clock(), cells(tmp_path)
    executor = FakeExecutor(clock, start=lambda worker: "fail")
    final, _, _ = run(tmp_path, todo, executor, clock, batch_retries=1)
    ((status, error),) = final.values()
    assert status == "failed" and "failed to start: actor died in __init__" in error
    assert executor.started == ["m1#1", "m1#2"]


def test_a_model_no_node_can_hold_fails_at_once_and_others_still_run(tmp_path) -> None:
    clock = Clock()
    todo = {**cells(tmp_path, model="big"), **cells(tmp_path, model="small")}
    executor = FakeExecutor(clock, unplaceable={"big": "big needs 2 GPUs on one node; the largest has 1"})
    final, _, _ = run(tmp_path, todo, executor, clock)
    by_model = {todo[c]["model"]["name"]: (s, e) for c, (s, e) in final.items()}
    assert by_model["small"] == ("done", None)
    assert by_model["big"][0] == "failed" and "needs 2 GPUs" in by_model["big"][1]
    assert executor.started == ["small#1"]


def test_the_sweep_timeout_fails_what_is_unfinished(tmp_path) -> None:
    clock, todo = Clock(), cells(tmp_path, tasks=("A", "B"))
    executor = FakeExecutor(clock, batch=lambda ids, attempt: ("hang", 0, attempt))
    final, _, _ = run(tmp_path, todo, executor, clock, timeout_s=10)
    assert {s for s, _ in final.values()} == {"failed"}
    assert all("sweep timeout (10 s) reached" in e for _, e in final.values())
    assert clock.now - 1000 <= 12 and executor.cancelled  # every worker was released


def test_replicas_share_a_models_queue_and_idle_workers_are_released(tmp_path) -> None:
    clock, todo = Clock(), cells(tmp_path, tasks=("A", "B", "C"))
    executor = FakeExecutor(clock, batch=lambda ids, attempt: ("finished", 2, 1))
    final, _, _ = run(tmp_path, todo, executor, clock, replicas=2)
    assert {s for s, _ in final.values()} == {"done"}
    assert executor.started == ["m1#1", "m1#2"]
    assert Counter(w for w, _, _ in executor.submitted) == Counter({"m1#1": 2, "m1#2": 1})
    assert sorted(executor.cancelled) == ["m1#1", "m1#2"]


def test_a_sweep_skips_cached_cells_and_records_every_job(tmp_path) -> None:
    clock, todo = Clock(), cells(tmp_path, tasks=("ChooseAttr", "ChooseCat"))  # valid: a sweep validates
    (cached_id, cached), (other_id, _) = list(todo.items())
    store = CellStore(tmp_path, cached)  # a finished cell from an earlier sweep
    store.write_meta(status="done", headline={"min_layer": 3}, counts={"samples": 0})
    for name in ("samples.parquet", "results.parquet"):
        atomic_write_parquet(store.dir / name, pd.DataFrame({"question_id": pd.Series([], dtype=str)}))
    jobs = [CellJob.resolve(i, [f"task={c['task']}"], lambda c=c: c) for i, c in enumerate(todo.values())]
    jobs.append(CellJob.resolve(2, ["task=???"], lambda: {}["results_dir"]))
    executor = FakeExecutor(clock)
    sweep = Sweep("t", tmp_path / "sweep", jobs, SweepSettings(poll_s=1.0, report=False), executor=executor)
    sweep.publish = lambda: None  # no W&B, no report here
    sweep.run()
    assert [ids for _, ids, _ in executor.submitted] == [[other_id]]  # the cached cell never ran
    record = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert record["status"] == "failed"  # one job had no valid cell config
    assert {c["cell_id"]: c["status"] for c in record["cells"]} == {cached_id: "cached", other_id: "done"}
    invalid = {"job": 2, "overrides": ["task=???"], "error": "KeyError: 'results_dir'"}
    assert record["invalid_jobs"] == [invalid]
    assert record["launcher"]["executor"] == "ray" and record["launcher"]["ray"]["connect_timeout_s"] == 60
    assert sweep.job_error(jobs[0]) is None and sweep.job_error(jobs[1]) is None
    assert "no valid cell config" in sweep.job_error(jobs[2])


@pytest.mark.parametrize("kind", ["sometimes", "bogus"])
def test_settings_reject_an_unknown_executor_or_display(tmp_path, kind) -> None:
    from mmflow.sweep.display import make_display

    if kind == "bogus":
        with pytest.raises(ValueError, match="progress must be auto, rich, log or none"):
            make_display("bogus", dict, 1, 1.0)
        return
    from mmflow.errors import ConfigError

    with pytest.raises(ConfigError) as raised:
        SweepSettings(executor=kind)  # refused when the settings are built, before any executor starts
    assert raised.value.message.startswith("hydra.launcher.executor='sometimes': must be one of ray, local")


def test_the_old_group_keys_are_deprecated_aliases_of_the_batch_keys():
    with pytest.warns(
        FutureWarning, match=r"hydra\.launcher\.group_timeout_s is deprecated.*batch_timeout_s=30"
    ):
        settings = SweepSettings.from_dict({"group_timeout_s": 30, "group_retries": 0})
    assert settings.batch_timeout_s == 30 and settings.batch_retries == 0
    assert settings.group_timeout_s is None and settings.group_retries is None  # moved, not kept twice
    from mmflow.errors import ConfigError

    with pytest.raises(ConfigError) as raised:
        SweepSettings.from_dict({"group_retries": 1, "batch_retries": 5})
    assert "group_retries=1 and hydra.launcher.batch_retries=5 disagree" in raised.value.message
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new names warn about nothing
        assert SweepSettings.from_dict({"batch_timeout_s": 30}).batch_timeout_s == 30


def test_the_launcher_config_accepts_the_old_keys():
    from omegaconf import OmegaConf

    from hydra_plugins.mmflow_launcher._config import MmflowLauncherConf

    node = OmegaConf.merge(
        OmegaConf.structured(MmflowLauncherConf), OmegaConf.from_dotlist(["group_retries=0"])
    )
    plain = OmegaConf.to_container(node, resolve=True)
    with pytest.warns(FutureWarning, match="group_retries is deprecated"):
        assert SweepSettings.from_dict(plain).batch_retries == 0
