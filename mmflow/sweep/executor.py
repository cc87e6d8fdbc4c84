"""The executor protocol the scheduler drives, the worker that holds one model, and the in-process
executor (single runs, and sweeps without Ray).

A worker is named by the scheduler (`"tiny-llava#1"`). The scheduler starts it for a model plan,
submits one cell batch at a time, polls for events, asks how many samples the running batch has
finished, and cancels it. Executors never block longer than the timeout `poll` is given, except the
in-process one, which computes a batch inside `submit` (it has no other thread to run it on).
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

from mmflow.execution.context import RunContext
from mmflow.sweep.plan import CellBatch, ModelPlan

if TYPE_CHECKING:
    from mmflow.config.spec import CellSpec

EventKind = Literal["ready", "start_failed", "finished", "batch_failed", "lost"]


@dataclass
class Event:
    """Something that happened to a worker.

    - ready: the worker was placed; `info` has node_id, actor_id, host, pid.
    - start_failed: the worker could not be started (`error`).
    - finished: its batch ended; `outcomes` has one `CellOutcome` dict per cell.
    - batch_failed: the batch raised inside a healthy worker (its cells fail, the worker stays).
    - lost: the worker or its node died while it held a batch (not the cells' fault: requeue).
    """

    worker: str
    kind: EventKind
    info: dict[str, Any] = field(default_factory=dict)
    outcomes: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None


class Executor(Protocol):
    def prepare(self, plans: list[ModelPlan]) -> dict[str, str]:
        """Choose each plan's worker options; return plan key -> reason for plans no worker can hold."""

    def start(self, worker: str, plan: ModelPlan) -> None:
        """Start a worker for `plan` (asynchronously: `ready` or `start_failed` comes from `poll`)."""

    def submit(self, worker: str, batch: CellBatch, context: RunContext) -> None:
        """Hand a ready, idle worker a batch; `finished`, `batch_failed` or `lost` comes from `poll`."""

    def poll(self, timeout_s: float) -> list[Event]:
        """Events since the last poll; waits at most `timeout_s` for the first one."""

    def progress(self, worker: str) -> int | None:
        """Samples the worker's current batch has finished, if known now (never blocks)."""

    def cancel(self, worker: str) -> None:
        """Stop the worker and free what it holds; a no-op for one that is gone."""

    def free_resources(self) -> str:
        """What the executor could still place (for error messages)."""


def short_error(exc: BaseException, limit: int = 600) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def where() -> dict[str, Any]:
    """This process, as a worker's `ready` info (Ray actors add their node and actor ids)."""
    return {"node_id": "local", "actor_id": None, "host": socket.gethostname(), "pid": os.getpid()}


class ModelWorker:
    """Holds one model: its weights load on the first batch and are reused for the next ones."""

    def __init__(self, model: dict[str, Any], backend: str, progress_bar: bool = False) -> None:
        self.model = model
        self.backend = backend
        self.progress_bar = progress_bar

    def run(
        self, specs: list[CellSpec], context: RunContext, on_sample: Callable[[int], None] | None = None
    ) -> list[dict[str, Any]]:
        """Compute a cell batch (cells sharing `identity.SHARED_KEYS`); one outcome dict per cell."""
        from mmflow.execution.runtime import run_cells
        from mmflow.models.registry import LOAD_COUNT, get_model
        from mmflow.wandb_logger import cell_logger

        loaded = get_model(self.model)  # the engine prepares attention (engine.attention)
        context = context.replace(model_loads=LOAD_COUNT["n"])
        outcomes = run_cells(
            loaded,
            specs,
            on_sample=on_sample,
            context=context,
            progress=self.progress_bar,
            logger_factory=cell_logger,
        )
        return [asdict(outcome) for outcome in outcomes]


class InProcessExecutor:
    """Workers in this process: a batch is computed inside `submit`, its events come from `poll`.

    A batch that raises fails its cells (`batch_failed`); there is no timeout on a running batch
    (nothing else could interrupt it) and a lost worker cannot happen.
    """

    def __init__(self, progress_bar: bool = True, clock: Callable[[], float] = time.monotonic) -> None:
        self.progress_bar = progress_bar
        self.workers: dict[str, ModelWorker] = {}
        self.events: list[Event] = []
        self.done: dict[str, int] = {}
        self.clock = clock

    def prepare(self, plans: list[ModelPlan]) -> dict[str, str]:
        return {}

    def start(self, worker: str, plan: ModelPlan) -> None:
        self.workers[worker] = ModelWorker(plan.model, plan.backend, self.progress_bar)
        self.events.append(Event(worker, "ready", info=where()))

    def submit(self, worker: str, batch: CellBatch, context: RunContext) -> None:
        self.done[worker] = 0
        info = where()
        context = context.replace(node_id=info["node_id"], host=info["host"], pid=info["pid"])
        try:
            outcomes = self.workers[worker].run(batch.specs, context, lambda n: self._tick(worker, n))
        except Exception as exc:  # the batch's cells fail; the next batch still runs
            self.events.append(
                Event(worker, "batch_failed", error=f"{type(exc).__name__}: {short_error(exc)}")
            )
            return
        self.events.append(Event(worker, "finished", outcomes=outcomes))

    def _tick(self, worker: str, n: int) -> None:
        self.done[worker] = self.done.get(worker, 0) + n

    def poll(self, timeout_s: float) -> list[Event]:
        events, self.events = self.events, []
        if not events and timeout_s > 0:
            time.sleep(min(timeout_s, 0.05))
        return events

    def progress(self, worker: str) -> int | None:
        return self.done.get(worker)

    def cancel(self, worker: str) -> None:
        self.workers.pop(worker, None)  # the loaded weights stay cached in this process

    def free_resources(self) -> str:
        return "this process"
