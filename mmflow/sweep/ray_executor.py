"""The Ray executor: one actor per worker, each holding one model (load once, run many batches).

Actors ask Ray for the resources of their model config (`model.resources`, overridden per model by
`SweepSettings.models`) and are spread across nodes. Every Ray call the driver makes has a timeout.

With `write_results=driver` (the default when joining a cluster) actors write nothing where they run:
the driver drains each actor's finished samples while it works and writes them (`mmflow.storage.relay`).
"""

from __future__ import annotations

import functools
import logging
import os
import re
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray
from ray.exceptions import RayError, RayTaskError

from mmflow.execution.context import RunContext
from mmflow.storage.relay import Op, Relay, relaying
from mmflow.sweep.executor import Event, ModelWorker, short_error
from mmflow.sweep.inbox import DriverBatch
from mmflow.sweep.plan import CellBatch, ModelPlan
from mmflow.sweep.settings import SweepSettings

if TYPE_CHECKING:
    from mmflow.config.spec import CellSpec

log = logging.getLogger(__name__)

GIB = 2**30
DRAIN_WAIT_S = 0.2  # an actor's `drain` waits this long for a first write (a long poll)
DRAIN_MAX_OPS = 256  # writes per `drain` reply
SETTLE_WAIT_S = 60.0  # for the last writes of a finished batch
WRITE_RESULTS = ("auto", "driver", "workers")


class ModelActor:
    """A Ray actor around a `ModelWorker`; answers `progress` while `run_batch` works."""

    def __init__(self, model: dict[str, Any], backend: str) -> None:
        assigned = len(ray.get_gpu_ids())  # a model given several GPUs is spread over them (placement)
        if assigned > 1:
            model = {**model, "resources": {**(model.get("resources") or {}), "gpus": assigned}}
        self.worker = ModelWorker(model, backend)
        self.token = ""
        self.batch_samples = 0
        self.relay: Relay | None = None

    def ready(self) -> dict[str, Any]:
        """Where this actor runs (also the sign that it was scheduled)."""
        context = ray.get_runtime_context()
        return {
            "node_id": context.get_node_id(),
            "actor_id": context.get_actor_id(),
            "host": socket.gethostname(),
            "pid": os.getpid(),
        }

    def progress(self) -> dict[str, Any]:
        return {"token": self.token, "samples": self.batch_samples}

    def run_batch(
        self,
        configs: list[CellSpec],
        context: RunContext,
        token: str,
        seeds: dict[str, dict[str, bytes]] | None = None,
        relay_buffer: int = 64,
    ) -> list[dict]:
        """Compute a cell batch; with `seeds` (the driver's files of its cells) inside a scratch
        folder whose writes wait in a queue of `relay_buffer` for the driver's `drain` calls."""
        from transformers.utils import logging as hf_logging

        self.token, self.batch_samples = token, 0
        hf_logging.disable_progress_bar()
        info = self.ready()
        context = context.replace(
            node_id=info["node_id"], actor_id=info["actor_id"], host=info["host"], pid=info["pid"]
        )
        if seeds is None:
            return self.worker.run(configs, context, on_sample=self._tick)
        self.relay = Relay(Path(tempfile.mkdtemp(prefix="mmflow-relay-")), relay_buffer)
        with relaying(self.relay, seeds):
            return self.worker.run(configs, context, on_sample=self._tick)

    def drain(self, wait_s: float, max_ops: int) -> list[Op]:
        """The writes the running (or just finished) batch has made since the last call, oldest first."""
        relay = self.relay
        return relay.take(wait_s, max_ops) if relay is not None else []

    def _tick(self, n: int) -> None:
        self.batch_samples += n


@functools.cache
def remote_actor_class() -> Any:
    return ray.remote(ModelActor)


@dataclass
class _Actor:
    handle: Any
    ready_ref: Any
    state: str = "starting"  # starting | idle | busy
    ref: Any = None
    token: str = ""
    progress_ref: Any = None
    samples: int | None = None
    inbox: DriverBatch | None = None  # write_results=driver: the batch's cells on the driver
    drain_ref: Any = None


class RayExecutor:
    """Workers as Ray actors; see `mmflow.sweep.executor.Executor`."""

    def __init__(self, settings: SweepSettings) -> None:
        self.settings = settings
        self.actors: dict[str, _Actor] = {}
        self.options: dict[str, dict[str, Any]] = {}
        self.tokens = 0
        self.relay = relay_results(settings)
        self.settled: list[Event] = []  # batches the driver settled without an actor (all cached)

    def prepare(self, plans: list[ModelPlan]) -> dict[str, str]:
        limits, errors = cluster_limits(), {}
        for plan in plans:
            try:
                plan.options = actor_options(plan, self.settings, limits)
            except ValueError as exc:
                errors[plan.key] = str(exc)
        return errors

    def start(self, worker: str, plan: ModelPlan) -> None:
        handle = remote_actor_class().options(**plan.options).remote(plan.model, plan.backend)
        self.actors[worker] = _Actor(handle, handle.ready.remote())

    def submit(self, worker: str, batch: CellBatch, context: RunContext) -> None:
        actor = self.actors[worker]
        self.tokens += 1
        actor.state, actor.token, actor.samples, actor.progress_ref = "busy", f"b{self.tokens}", 0, None
        if not self.relay:
            actor.ref = actor.handle.run_batch.remote(batch.specs, context, actor.token)
            return
        inbox = actor.inbox = DriverBatch.open(batch.specs)
        if not inbox.configs:  # nothing left to compute: settled here
            actor.state, actor.inbox = "idle", None
            self.settled.append(Event(worker, "finished", outcomes=inbox.outcomes))
            return
        buffer = self.settings.relay_buffer
        actor.ref = actor.handle.run_batch.remote(inbox.configs, context, actor.token, inbox.seeds, buffer)
        actor.drain_ref = actor.handle.drain.remote(DRAIN_WAIT_S, DRAIN_MAX_OPS)

    def poll(self, timeout_s: float) -> list[Event]:
        """Events since the last poll; relayed writes that arrive meanwhile are written at once."""
        events, self.settled = self.settled, []
        deadline = time.monotonic() + timeout_s
        while not events:
            refs = {a.ref: n for n, a in self.actors.items() if a.state == "busy" and a.ref is not None}
            refs.update({a.ready_ref: n for n, a in self.actors.items() if a.state == "starting"})
            drains = {a.drain_ref: n for n, a in self.actors.items() if a.drain_ref is not None}
            left = deadline - time.monotonic()
            if not refs and not drains:
                time.sleep(max(0.0, left))
                return []
            ready, _ = ray.wait([*refs, *drains], num_returns=1, timeout=max(0.0, left))
            if ready:
                ready, _ = ray.wait([*refs, *drains], num_returns=len(refs) + len(drains), timeout=0)
            for ref in (r for r in ready if r in drains):
                try:
                    self._drained(drains[ref])
                except RayError:  # the actor died: its batch's result says so
                    pass
            events = [self._event(refs[ref], ref) for ref in ready if ref in refs]
            if time.monotonic() >= deadline:
                break
        return events

    def _drained(self, worker: str, again: bool = True, wait_s: float | None = None) -> int:
        """Write what the actor's pending `drain` call brought; ask for more when `again`.

        Raises RayError when the actor is gone or does not answer within `wait_s` (default: poll_s).
        """
        actor = self.actors[worker]
        ref, actor.drain_ref = actor.drain_ref, None
        if ref is None or actor.inbox is None:
            return 0
        ops = ray.get(ref, timeout=wait_s or self.settings.poll_s)
        actor.inbox.apply(ops)
        if again:
            actor.drain_ref = actor.handle.drain.remote(DRAIN_WAIT_S, DRAIN_MAX_OPS)
        return len(ops)

    def _settle(self, worker: str, outcomes: list[dict] | None) -> list[dict]:
        """Write every relayed write still on its way, release the cell locks (write_results=driver)."""
        actor = self.actors[worker]
        inbox = actor.inbox
        if inbox is None:
            return outcomes or []
        try:
            if outcomes is not None:  # the batch returned: its last writes wait in the actor
                self._drained(worker, wait_s=SETTLE_WAIT_S)  # asked before it returned: may miss some
                while self._drained(worker, wait_s=SETTLE_WAIT_S):  # asked after: empty means all
                    pass
            else:
                self._drained(worker, again=False)
        except RayError as exc:
            if outcomes is not None:  # never report done what the driver did not get in full
                error = f"the driver did not receive every file of this batch: {short_error(exc, 300)}"
                outcomes = [{**o, "status": "failed", "error": error} for o in outcomes]
        finally:
            actor.drain_ref, actor.inbox = None, None
            inbox.close()
        log.info(
            "%s: %d file write(s), %.1f MiB received from the actor (%.2f s writing)",
            *(worker, inbox.ops, inbox.bytes / 2**20, inbox.apply_s),
        )
        return inbox.settle(outcomes or [])

    def _event(self, worker: str, ref: Any) -> Event:
        actor = self.actors[worker]
        wait_s = self.settings.poll_s
        if actor.state == "starting":
            try:
                info = ray.get(ref, timeout=wait_s)
            except RayError as exc:
                return Event(worker, "start_failed", error=short_error(exc, 300))
            actor.state = "idle"
            return Event(worker, "ready", info=info)
        actor.state, actor.ref = "idle", None
        try:
            outcomes = ray.get(ref, timeout=wait_s)
        except RayTaskError as exc:  # the batch raised inside a healthy actor
            self._settle(worker, [])
            return Event(worker, "batch_failed", error=task_error(exc))
        except RayError as exc:  # the actor or its node died
            self._settle(worker, None)
            return Event(worker, "lost", error=short_error(exc, 300))
        return Event(worker, "finished", outcomes=self._settle(worker, outcomes))

    def progress(self, worker: str) -> int | None:
        actor = self.actors.get(worker)
        if actor is None or actor.state != "busy":
            return None
        if actor.progress_ref is None:
            actor.progress_ref = actor.handle.progress.remote()
        ready, _ = ray.wait([actor.progress_ref], num_returns=1, timeout=0)
        if ready:
            ref, actor.progress_ref = actor.progress_ref, None
            try:
                report = ray.get(ref, timeout=self.settings.poll_s)
            except RayError:
                return actor.samples  # a dead actor shows up through its batch's result
            if report["token"] == actor.token:
                actor.samples = int(report["samples"])
        return actor.samples

    def cancel(self, worker: str) -> None:
        actor = self.actors.get(worker)
        if actor is None:
            return
        if actor.inbox is not None:  # its unfinished cells stay as the driver has them (resumable)
            self._settle(worker, None)
        self.actors.pop(worker, None)
        try:
            ray.kill(actor.handle, no_restart=True)
        except Exception:  # noqa: BLE001 - already dead or unreachable
            pass

    def free_resources(self) -> str:
        return str(ray.available_resources())


def cluster_limits() -> dict[str, float]:
    """The largest CPU, GPU and memory amounts any single alive node offers."""
    limits = {"CPU": 0.0, "GPU": 0.0, "memory": 0.0}
    for node in ray.nodes():
        if node.get("Alive"):
            for name in limits:
                limits[name] = max(limits[name], float(node.get("Resources", {}).get(name, 0.0)))
    return limits


def actor_options(plan: ModelPlan, settings: SweepSettings, limits: dict[str, float]) -> dict[str, Any]:
    """Ray options of the plan's actors; GPU requests map to CPU on a cluster without GPUs.

    Raises ValueError when no node could ever hold the actor (instead of waiting forever).
    """
    wanted = {**plan.model.get("resources", {}), **settings.models.get(plan.name, {})}
    gpus = float(wanted.get("gpus") or 0)
    cpus = float(wanted.get("cpus") or 1)
    memory = float(wanted.get("memory_gb") or 0) * GIB
    if gpus and not limits["GPU"]:
        log.warning("%s asks for %g GPU but the cluster has none: running it on CPU", plan.name, gpus)
        gpus = 0.0
    if gpus > limits["GPU"]:
        raise ValueError(f"{plan.name} needs {gpus:g} GPUs on one node; the largest has {limits['GPU']:g}")
    if cpus > limits["CPU"]:
        log.warning("%s asks for %g CPUs; the largest node has %g", plan.name, cpus, limits["CPU"])
        cpus = limits["CPU"]
    if memory > limits["memory"]:
        largest = limits["memory"] / GIB
        log.warning("%s asks for %.0f GiB; the largest node has %.1f", plan.name, memory / GIB, largest)
        memory = limits["memory"]
    options: dict[str, Any] = {
        "num_cpus": cpus,
        "num_gpus": gpus,
        "scheduling_strategy": settings.scheduling,
        "max_concurrency": 3,  # `progress` and `drain` answer while `run_batch` works
        "max_restarts": 0,  # the scheduler replaces a dead actor itself and requeues its batch
    }
    if memory:
        options["memory"] = int(memory)
    return options


def relay_results(settings: SweepSettings) -> bool:
    """Whether the driver writes the cell files (see `SweepSettings.write_results`)."""
    mode = settings.write_results
    if mode not in WRITE_RESULTS:
        known = ", ".join(WRITE_RESULTS)
        raise ValueError(f"hydra.launcher.write_results must be one of {known}, got {mode!r}")
    if mode == "auto":
        address = str(((settings.ray.init or {}) if settings.ray else {}).get("address") or "").strip()
        return bool(address)
    return mode == "driver"


def task_error(exc: RayTaskError) -> str:
    """The original exception first ("Type: message"), then the remote traceback for the details."""
    cause = getattr(exc, "cause", None)
    head = f"{type(cause).__name__}: {short_error(cause)}" if isinstance(cause, BaseException) else ""
    details = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))[-3000:]
    return f"{head}\n{details}" if head else details
