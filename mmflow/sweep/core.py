"""One sweep from start to end: jobs -> cells -> (skip finished) -> plans -> scheduler -> records.

A *job* is one requested point of the grid (a Hydra job, or the single run); its *cell* is the
resolved cell config. Jobs that name the same cell share it. Cells already done are `cached` and
never reach a worker. The rest run through the scheduler on the chosen executor (Ray actors or this
process). Every status change is one line appended to `events.jsonl`; `sweep.json` is written at the
start, at most every `record_every_s` while running, and at the end (`record`); then come the
summary table, the sweep-level W&B run (sweeps of more than one cell) and the HTML report (when asked).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmflow.errors import ConfigError
from mmflow.execution.context import RunContext
from mmflow.storage.locks import CellLock, describe, mark_stale_sweeps, sigterm_as_interrupt, this_process
from mmflow.storage.secrets import redact_hydra_files
from mmflow.storage.store import CellStore
from mmflow.sweep.causes import config_error
from mmflow.sweep.display import make_display
from mmflow.sweep.executor import Executor, InProcessExecutor, short_error
from mmflow.sweep.plan import plan_models
from mmflow.sweep.record import (
    EventLog,
    announce_from_record,
    labels,
    print_failure_line,
    print_summary,
    write_sweep_json,
)
from mmflow.sweep.settings import SweepSettings

if TYPE_CHECKING:
    from mmflow.config.spec import CellSpec

log = logging.getLogger("mmflow.sweep")

FINAL = ("done", "cached", "failed")
# How long a stopping driver waits, in all, for the workers it cancelled to let go of their cells'
# locks before it records their ending (a killed Ray actor's lock is released when its process exits).
STOP_WAIT_S = 10.0


@dataclass
class CellJob:
    """One requested job and the cell it names (or why its config could not be resolved)."""

    idx: int
    overrides: list[str]
    cell: dict[str, Any] | None = None
    cell_id: str = ""
    error: str | None = None  # the config could not be resolved into a cell
    invalid: str | None = None  # the cell cannot compute anything meaningful: it fails alone, by name
    spec: CellSpec | None = None  # the cell, typed (`cell` is its plain config)

    @classmethod
    def resolve(
        cls, idx: int, overrides: list[str], make_cell: Callable[[], CellSpec | dict[str, Any]]
    ) -> CellJob:
        """`make_cell()` gives the cell spec (or its resolved config); an error fails this job, not the
        sweep. Each cell is validated once, on its own (`CellSpec.check`), before any model loads."""
        from mmflow.config.spec import CellSpec
        from mmflow.errors import CellConfigError

        job = cls(idx, list(overrides))
        try:
            made = make_cell()
            job.cell = made.config if isinstance(made, CellSpec) else dict(made)
            job.spec = CellSpec.from_config(made, check=False)
            job.cell_id = job.spec.id
            job.spec.check()
        except CellConfigError as exc:  # this cell fails alone, with the key named
            if job.spec is None:  # refused while resolving (an unknown key): no cell, an invalid job
                job.cell, job.error = None, f"{type(exc).__name__}: {exc}"
            else:
                job.invalid = f"{type(exc).__name__}: {exc}"
        except Exception as exc:
            job.cell, job.spec, job.error = None, None, f"{type(exc).__name__}: {config_error(exc)}"
        return job


class SweepFailed(SystemExit):
    """A sweep ended with failed cells or invalid jobs: exit code 1, its summary already printed."""

    def __init__(self, sweep: Sweep) -> None:
        super().__init__(1)
        self.sweep = sweep


class Sweep:
    """Runs `jobs` and records them under `sweep_dir` (see the module docstring)."""

    def __init__(
        self,
        name: str,
        sweep_dir: str | Path,
        jobs: list[CellJob],
        settings: SweepSettings,
        *,
        logger_cfg: dict[str, Any] | None = None,
        single: bool = False,
        executor: Executor | None = None,
    ) -> None:
        self.name = name
        self.sweep_dir = Path(sweep_dir).resolve()
        self.jobs = jobs
        self.settings = settings
        self.logger_cfg = logger_cfg
        self.single = single  # a single run: no sweep-level W&B run, report only when asked
        self.executor = executor
        self.started = time.time()
        self.cells: dict[str, dict[str, Any]] = {}  # cell id -> plain config (records, labels, checks)
        self.specs: dict[str, CellSpec] = {}  # cell id -> spec, built once where the job was resolved
        for job in jobs:
            if job.cell is not None:
                self.cells.setdefault(job.cell_id, job.cell)
                if job.spec is not None:
                    self.specs.setdefault(job.cell_id, job.spec)
        if self.cells:  # a per-model setting for a model no cell uses: one line, before anything runs
            settings.check_model_names(str((c.get("model") or {}).get("name")) for c in self.cells.values())
        self.status: dict[str, str] = {}
        self.errors: dict[str, str] = {}
        self.driver = this_process()  # lets a later run tell a killed driver's `running` record
        self.events = EventLog(self.sweep_dir / "events.jsonl")
        self.record_written = 0.0  # monotonic time sweep.json was last written
        self._labels: dict[str, dict[str, Any]] = {}

    def store(self, cell_id: str) -> CellStore:
        """The folder of a cell of this sweep (from its spec: its id is not hashed again)."""
        return CellStore.of(self.specs.get(cell_id) or self.cells[cell_id])

    def labels(self, cell_id: str) -> dict[str, Any]:
        """What a person reads to recognise a cell (`record.labels`), computed once per cell."""
        if cell_id not in self._labels:
            self._labels[cell_id] = labels(self.cells[cell_id])
        return self._labels[cell_id]

    @property
    def context(self) -> RunContext:
        """What every cell.json of this sweep records about the sweep."""
        return RunContext(sweep_name=self.name, sweep_dir=str(self.sweep_dir))

    def elapsed(self) -> float:
        return time.time() - self.started

    # -- running

    def run(self) -> None:
        """Compute what is not cached, then write the record, the summary and the end-of-sweep outputs.

        Secrets in Hydra's saved configs are redacted before and after; a `sweep.json` left `running`
        by a killed driver next to this one is marked `interrupted`; SIGTERM ends as Ctrl-C does.
        """
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        redact_hydra_files(self.sweep_dir)  # multirun.yaml, saved by Hydra's sweeper before us
        mark_stale_sweeps(self.sweep_dir.parent, self.sweep_dir)
        try:
            with sigterm_as_interrupt():
                self._run()
        finally:
            self.events.close()
            redact_hydra_files(self.sweep_dir)  # the jobs' .hydra folders

    def _run(self) -> None:
        self.use_results_store()
        for cell_id in self.cells:
            self.status[cell_id] = "cached" if self.store(cell_id).is_done() else "pending"
        for job in (j for j in self.jobs if j.invalid and j.cell is not None):
            store = self.store(job.cell_id)
            store.write_meta(status="failed", error=job.invalid, **self.context.meta())
            self.status[job.cell_id], self.errors[job.cell_id] = "failed", job.invalid
            self.events.append(job.cell_id, "failed", job.invalid)
        todo = {cid: cell for cid, cell in self.cells.items() if self.status[cid] == "pending"}
        if todo and self.settings.preflight:
            todo = self.preflight(todo)
        log.info(
            "sweep '%s': %d jobs, %d cells (%d finished before, %d to compute) -> %s",
            *(self.name, len(self.jobs), len(self.cells), self.counts()["cached"], len(todo)),
            self.sweep_dir,
        )
        write_sweep_json(self, "running")
        try:
            if todo:
                self.compute(todo)
        except BaseException as exc:
            interrupted = isinstance(exc, KeyboardInterrupt)
            self.record_stop(exc)
            write_sweep_json(self, "interrupted" if interrupted else "error", error=short_error(exc))
            log.warning("sweep stopped: re-run the same command to resume (finished samples are kept)")
            if interrupted:
                exc.mmflow_reported = True  # the command line (cli.run_hydra) ends without a traceback
            raise
        write_sweep_json(self, "failed" if self.failed_ids() or self.invalid_jobs() else "done")
        if self.single and self.failed_ids():  # one line, once: the cause and its fix
            print_failure_line(self)
        else:
            print_summary(self)
        self.publish()

    def use_results_store(self) -> None:
        """A results_dir URI (`mmflow.storage.objectstore`): the driver is its single writer; its cells are
        read from the store into the local mirror first, so resume sees what the store holds."""
        if not any(cell.get("results_uri") for cell in self.cells.values()):
            return
        from mmflow.storage.objectstore import pull_cells

        if self.settings.write_results == "workers":
            raise ConfigError(
                "results_dir is an object-store URI: only the driver writes it; "
                "drop hydra.launcher.write_results=workers (or use driver)"
            )
        self.settings.write_results = "driver"
        try:
            pull_cells(self.cells)
        except Exception as exc:  # noqa: BLE001 - no bucket, no credentials, no endpoint: one line
            raise ConfigError(f"results store unreachable: {type(exc).__name__}: {exc}") from None

    def preflight(self, todo: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """Check each model and data source once (`mmflow.sweep.preflight`): one line per root cause
        with the number of cells it blocks; those cells fail with it, the others go on."""
        from mmflow.sweep.preflight import preflight

        return self.fail_blocked(todo, preflight(todo, self.settings))

    def joins_cluster(self) -> bool:
        """This sweep's actors run on a Ray cluster it joins (other nodes may lack a model)."""
        init = self.settings.ray.init or {} if self.settings.ray else {}
        return self.executor is None and self.settings.executor == "ray" and bool(init.get("address"))

    def fail_blocked(
        self, todo: dict[str, dict[str, Any]], blocked: dict[str, list[str]]
    ) -> dict[str, dict[str, Any]]:
        """Fail the cells of each preflight root cause (one line each); the rest of `todo`."""
        for cause, cell_ids in blocked.items():
            log.warning("preflight: %s (blocks %d cell%s)", cause, len(cell_ids), "s" * (len(cell_ids) > 1))
            error = f"preflight: {cause}"
            for cell_id in cell_ids:
                todo.pop(cell_id)
                self.store(cell_id).write_meta(status="failed", error=error, **self.context.meta())
                self.status[cell_id], self.errors[cell_id] = "failed", error
                self.events.append(cell_id, "failed", error)
        return todo

    def compute(self, todo: dict[str, dict[str, Any]]) -> None:
        from mmflow.sweep.scheduler import Scheduler

        with self.executor_session() as executor:
            if self.joins_cluster() and self.settings.preflight:
                from mmflow.sweep.prefetch import node_preflight

                todo = self.fail_blocked(todo, node_preflight(todo))
                if not todo:
                    return
            specs = {cid: self.specs.get(cid, cell) for cid, cell in todo.items()}
            scheduler = Scheduler(
                self.settings, plan_models(specs, self.settings), executor, self.record, self.context
            )
            display = make_display(
                self.display_kind(), self.counts, len(self.cells), self.settings.log_every_s
            )
            display.start()
            try:
                scheduler.run(lambda s: display.update(s.worker_rows(), s.eta()))
            finally:
                display.stop()

    @contextmanager
    def executor_session(self) -> Iterator[Executor]:
        """The given executor, or the settings' one (a Ray session lasts as long as the sweep)."""
        if self.executor is not None:
            yield self.executor
        elif self.settings.executor == "local":
            yield InProcessExecutor(progress_bar=self.settings.progress in ("auto", "rich"))
        elif self.settings.executor == "ray":
            from mmflow.sweep.ray_executor import RayExecutor
            from mmflow.sweep.ray_session import ray_session

            with ray_session(self.settings.ray) if self.settings.ray else nullcontext():
                yield RayExecutor(self.settings)
        else:
            raise ValueError(f"hydra.launcher.executor must be ray or local, got {self.settings.executor!r}")

    def display_kind(self) -> str:
        """In-process batches draw their own progress bar; the live display is for Ray workers."""
        local = self.executor is None and self.settings.executor == "local"
        return "none" if local and self.settings.progress != "log" else self.settings.progress

    def record(self, cell_id: str, status: str, error: str | None) -> None:
        previous = self.status.get(cell_id)
        self.status[cell_id] = status
        if error:
            self.errors[cell_id] = error
        if status != previous:
            self.events.append(cell_id, status, error)
        if status == "done" and previous != "done" and self.settings.executor == "ray":
            announce_from_record(self.store(cell_id))  # an actor's own line may be lost with Ray
        if status in FINAL and previous not in FINAL:
            # a single run's failure is printed once, at its end, with its fix (`print_failure_line`)
            level = logging.WARNING if status == "failed" and not self.single else logging.DEBUG
            log.log(level, "cell %s %s%s", cell_id, status, f": {error.splitlines()[0]}" if error else "")
        if time.monotonic() - self.record_written >= self.settings.record_every_s:
            write_sweep_json(self, "running")

    def record_stop(self, exc: BaseException) -> None:
        """Record in `cell.json` how the cells still running ended when the driver stopped (Ctrl-C,
        SIGTERM, an error): `interrupted` (or `failed`), with the reason, in their `runs` list too.

        The workers were cancelled (Ray actors killed) before this runs; each cell is recorded once its
        lock is free (so never while a worker still writes it, waiting `STOP_WAIT_S` in all). A cell
        that recorded its own ending (a local run, or a batch that just finished) keeps it.
        """
        state = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
        why = f"the sweep driver stopped ({type(exc).__name__}: {short_error(exc, 200)})"
        deadline = time.monotonic() + STOP_WAIT_S
        for cell_id in [cid for cid, status in self.status.items() if status == "running"]:
            store = self.store(cell_id)
            lock = CellLock(store.dir)
            try:
                if not lock.acquire(max(0.0, deadline - time.monotonic())):
                    owner = describe(lock.owner())
                    log.warning("cell %s is still held by %s; its ending is not recorded", cell_id, owner)
                    self.status[cell_id] = state
                    continue
                try:
                    meta = store.read_meta()
                    if meta.get("status") in (None, "running"):
                        runs = meta.get("runs") or []
                        if runs and not runs[-1].get("ended"):
                            runs[-1]["ended"] = f"{state}: {why}"
                        meta = store.write_meta(status=state, error=why, runs=runs, **self.context.meta())
                    self.status[cell_id] = str(meta.get("status") or state)
                finally:
                    lock.release()
            except Exception as write_exc:  # noqa: BLE001 - the original ending matters more
                log.warning("could not record %s for cell %s: %s", state, cell_id, write_exc)
                self.status[cell_id] = state

    def counts(self) -> dict[str, int]:
        values = list(self.status.values())
        return {s: values.count(s) for s in ("done", "cached", "failed", "running", "pending")}

    def failed_ids(self) -> list[str]:
        return [cid for cid, status in self.status.items() if status == "failed"]

    def invalid_jobs(self) -> list[CellJob]:
        return [job for job in self.jobs if job.error]

    def job_error(self, job: CellJob) -> str | None:
        """Why `job` did not produce a finished cell (None when it did)."""
        if job.error is not None or job.cell is None:
            return f"job #{job.idx} has no valid cell config: {job.error}"
        status = self.status.get(job.cell_id, "pending")
        if status in ("done", "cached"):
            return None
        reason = (self.errors.get(job.cell_id) or "did not finish").splitlines()[0]
        return f"cell {job.cell_id} {status}: {reason}"

    # -- end-of-sweep outputs

    def cell_dirs(self) -> list[Path]:
        return [Path(cell["results_dir"]) / cid for cid, cell in self.cells.items()]

    def wants_report(self) -> bool:
        return self.settings.report is True or (self.settings.report is None and not self.single)

    def publish(self) -> Path | None:
        """The sweep-level W&B run and the HTML report; their failure never fails the sweep."""
        if not self.single:
            from mmflow.wandb_logger import log_sweep

            try:
                log_sweep(self.sweep_dir, self.cell_dirs(), self.logger_cfg)
            except Exception as exc:  # outputs only: the cells are already safe on disk
                log.warning("sweep-level W&B run failed: %s", short_error(exc))
        if not self.wants_report():
            return None
        from mmflow.report import build_report

        try:
            index = build_report(self.sweep_dir, cell_dirs=self.cell_dirs(), workers=1)  # no fork here
        except Exception as exc:
            log.warning("report failed: %s (run `mmflow report %s`)", short_error(exc), self.sweep_dir)
            return None
        print(f"[mmflow] report: {index}")
        return index
