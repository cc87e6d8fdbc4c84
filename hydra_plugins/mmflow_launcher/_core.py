"""The mmflow launcher's engine: compose the grid, skip finished cells, run cell groups on Ray actors.

The driver composes every job, computes its cell id and skips cells that are already complete. The
rest are grouped by model, then by `runtime.group_key` (cells that share samples and clean passes).
Each model gets `replicas` actors; an actor loads its model once and runs whole groups handed to it
from the model's queue. A group whose actor dies, hangs or times out goes back to the queue and
runs on a fresh actor, resuming from the cells' part files. A group that raises fails its cells
only. Every Ray wait has a timeout; the sweep ends with a table, `sweep.json` and a `JobReturn` per job.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import os
import re
import socket
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, configure_log, filter_overrides, run_job, setup_globals
from omegaconf import DictConfig, OmegaConf, open_dict
from ray.exceptions import RayError, RayTaskError

from hydra_plugins.mmflow_launcher._config import MmflowLauncherConf
from mmflow.cli import cell_config
from mmflow.locks import mark_stale_sweeps, sigterm_as_interrupt, this_process
from mmflow.secrets import forwarded_env, redact, redact_hydra_files, warn_runtime_env_secrets
from mmflow.store import CellStore, atomic_write_json
from mmflow.validate import CellConfigError, validate_cell

if TYPE_CHECKING:
    from hydra_plugins.mmflow_launcher import MmflowLauncher

log = logging.getLogger(__name__)

GIB = 2**30
FINAL = ("done", "cached", "failed")


class CellFailed(RuntimeError):
    """A job's cell ended failed (its `JobReturn` carries this, so the sweep exits non-zero)."""


# ----------------------------------------------------------------------------------------- the actor


class ModelActor:
    """One Ray actor = one model: weights load on the first group and are reused for the next ones."""

    def __init__(self, model: dict[str, Any], backend: str) -> None:
        self.model = model
        self.backend = backend
        self.token = ""
        self.group_samples = 0

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
        return {"token": self.token, "group_samples": self.group_samples}

    def run_group(self, configs: list[dict], context: dict[str, Any], token: str) -> list[dict]:
        """Run cells that share `runtime.SHARED_KEYS`; one outcome dict per cell."""
        from transformers.utils import logging as hf_logging

        from mmflow.models.registry import LOAD_COUNT, get_model
        from mmflow.runtime import run_cells
        from mmflow.wandb_logger import cell_logger

        self.token, self.group_samples = token, 0
        hf_logging.disable_progress_bar()
        loaded = get_model(self.model)  # the engine prepares attention (engine.attention)
        context = {**context, **self.ready(), "model_loads": LOAD_COUNT["n"]}
        outcomes = run_cells(
            loaded, configs, on_sample=self._tick, context=context, logger_factory=cell_logger
        )
        return [asdict(outcome) for outcome in outcomes]

    def _tick(self, n: int) -> None:
        self.group_samples += n


@functools.cache
def remote_actor_class() -> Any:
    return ray.remote(ModelActor)


# ------------------------------------------------------------------------------ jobs, groups, plans


@dataclass
class Job:
    """One Hydra job of the grid and the cell it names."""

    idx: int
    overrides: list[str]
    config: DictConfig
    cell: dict[str, Any] | None = None
    cell_id: str = ""
    error: str | None = None  # the config could not be resolved into a cell
    invalid: str | None = None  # the cell cannot compute anything meaningful (it fails alone)


@dataclass
class Group:
    """Cells computed together on one actor (one clean pass per sample for all of them)."""

    plan: ModelPlan
    configs: list[dict]
    cell_ids: list[str]
    attempt: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def n_samples(self) -> int:
        return int(self.configs[0].get("n_samples", 0))


@dataclass
class ModelPlan:
    """Everything the driver knows about one model: its config, actor options and queue of groups."""

    key: str
    name: str
    model: dict[str, Any]
    backend: str
    replicas: int
    options: dict[str, Any] = field(default_factory=dict)
    queue: deque[Group] = field(default_factory=deque)
    serial: int = 0
    start_failures: int = 0


@dataclass
class Slot:
    """One actor as the driver sees it: starting, idle or busy with a group."""

    plan: ModelPlan
    name: str
    handle: Any
    ready_ref: Any
    created: float
    state: str = "starting"
    node_id: str = ""
    actor_id: str = ""
    group: Group | None = None
    ref: Any = None
    token: str = ""
    started: float = 0.0
    last_sample: float = 0.0
    group_samples: int = 0
    progress_ref: Any = None
    history: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=40))

    def observe(self, samples: int, now: float) -> None:
        if samples > self.group_samples:
            self.last_sample = now
        self.group_samples = samples
        self.history.append((now, samples))

    def rate(self, window_s: float = 20.0) -> float:
        """Samples per second over the recent past."""
        now = time.monotonic()
        points = [(t, n) for t, n in self.history if now - t <= window_s]
        if len(points) < 2 or points[-1][0] <= points[0][0]:
            return 0.0
        return (points[-1][1] - points[0][1]) / (points[-1][0] - points[0][0])


def model_key(cell: dict[str, Any]) -> str:
    return json.dumps([cell["model"], attention_backend(cell)], sort_keys=True, default=str)


def attention_backend(cell: dict[str, Any]) -> str:
    return str(cell.get("engine", {}).get("attention", "sdpa"))


def make_groups(cells: dict[str, dict], reuse_models: bool, conf: MmflowLauncherConf) -> list[ModelPlan]:
    """Model plans, each with its queue of groups, in the grid's order."""
    from mmflow.runtime import group_key

    plans: dict[str, ModelPlan] = {}
    groups: dict[tuple[str, str], Group] = {}
    for cell_id, cell in cells.items():
        key = model_key(cell)
        if key not in plans:
            name = cell["model"]["name"]
            replicas = int(conf.models.get(name, {}).get("replicas", conf.replicas))
            plans[key] = ModelPlan(key, name, cell["model"], attention_backend(cell), max(1, replicas))
        plan = plans[key]
        gkey = (key, group_key(cell) if reuse_models else cell_id)
        if gkey not in groups:
            groups[gkey] = Group(plan, [], [])
            plan.queue.append(groups[gkey])
        groups[gkey].configs.append(cell)
        groups[gkey].cell_ids.append(cell_id)
    return list(plans.values())


# -------------------------------------------------------------------------------- Ray and resources


def cluster_limits() -> dict[str, float]:
    """The largest CPU, GPU and memory amounts any single alive node offers."""
    limits = {"CPU": 0.0, "GPU": 0.0, "memory": 0.0}
    for node in ray.nodes():
        if node.get("Alive"):
            for name in limits:
                limits[name] = max(limits[name], float(node.get("Resources", {}).get(name, 0.0)))
    return limits


def actor_options(plan: ModelPlan, conf: MmflowLauncherConf, limits: dict[str, float]) -> dict[str, Any]:
    """Ray options of the plan's actors; GPU requests map to CPU on a cluster without GPUs.

    Raises ValueError when no node could ever hold the actor (instead of waiting forever).
    """
    wanted = {**plan.model.get("resources", {}), **conf.models.get(plan.name, {})}
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
        "scheduling_strategy": conf.scheduling,
        "max_concurrency": 2,  # `progress` answers while `run_group` works
        "max_restarts": 0,  # the driver replaces a dead actor itself and requeues its group
    }
    if memory:
        options["memory"] = int(memory)
    return options


@contextmanager
def ray_session(ray_cfg: dict[str, Any]) -> Iterator[None]:
    """Join `ray.address` (`auto`, `ray://…`, host:port) or start a local Ray when it is empty."""
    if ray.is_initialized():
        yield
        return
    address = str(ray_cfg.get("address") or "").strip() or None
    env = forwarded_env(ray_cfg.get("forward_env") or [], os.environ)
    runtime_env = copy.deepcopy(ray_cfg.get("runtime_env") or {})
    warn_runtime_env_secrets(runtime_env)
    if env:
        runtime_env["env_vars"] = {**env, **runtime_env.get("env_vars", {})}
    kwargs: dict[str, Any] = {
        "runtime_env": runtime_env or None,
        "log_to_driver": ray_cfg.get("log_to_driver", True),
    }
    if address is None:  # a local Ray for this sweep only
        kwargs.update(num_cpus=ray_cfg.get("num_cpus"), num_gpus=ray_cfg.get("num_gpus"))
        kwargs.update(include_dashboard=False)
    log.info("Ray: %s", f"joining {address}" if address else "starting a local instance")
    if address is not None:
        check_reachable(address, float(ray_cfg.get("connect_timeout_s") or 60))
    ray.init(address=address, **kwargs)
    try:
        yield
    finally:
        ray.shutdown()


def check_reachable(address: str, timeout_s: float) -> None:
    """Fail fast when a `host:port` or `ray://host:port` address does not answer (Ray would retry for
    many minutes); `auto` is left to Ray, which fails at once when no cluster is known."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
            return
        except OSError as exc:
            if time.monotonic() > deadline:
                raise ConnectionError(
                    f"no Ray cluster answers at {address} after {timeout_s:g} s ({exc}); start one with "
                    "`ray start --head` or fix ray.address"
                ) from None
            time.sleep(1)


def task_error(exc: RayTaskError) -> str:
    """The original exception first ("Type: message"), then the remote traceback for the details."""
    cause = getattr(exc, "cause", None)
    head = f"{type(cause).__name__}: {short_error(cause)}" if isinstance(cause, BaseException) else ""
    details = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))[-3000:]
    return f"{head}\n{details}" if head else details


def short_error(exc: BaseException, limit: int = 600) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------------------- scheduler


class Scheduler:
    """The driver loop: hand queued groups to idle actors, watch them, requeue what a dead actor held."""

    def __init__(
        self,
        conf: MmflowLauncherConf,
        plans: list[ModelPlan],
        record: Callable[[str, str, str | None], None],
        context: dict[str, Any],
    ) -> None:
        self.conf = conf
        self.plans = plans
        self.record = record
        self.context = context
        self.slots: list[Slot] = []
        self.started = self.last_busy = time.monotonic()
        self.tokens = 0

    def run(self, display: Display) -> None:
        deadline = self.started + self.conf.timeout_s
        try:
            while self.has_work():
                if time.monotonic() > deadline:
                    self.abort(f"sweep timeout ({self.conf.timeout_s:g} s) reached; re-run to resume")
                    break
                self.fill()
                self.wait()
                self.poll_progress()
                self.check_timeouts()
                display.update(self.actor_rows(), self.eta())
        finally:
            for slot in list(self.slots):
                self.drop(slot)

    def has_work(self) -> bool:
        return any(p.queue for p in self.plans) or any(s.state == "busy" for s in self.slots)

    # -- actors

    def fill(self) -> None:
        """Give idle actors work, release actors whose model has none left, start the ones missing."""
        for plan in self.plans:
            mine = [s for s in self.slots if s.plan is plan]
            for slot in mine:
                if slot.state == "idle" and plan.queue:
                    self.assign(slot, plan.queue.popleft())
                elif slot.state in ("idle", "starting") and not plan.queue:
                    self.drop(slot)
            mine = [s for s in self.slots if s.plan is plan]
            busy = sum(s.state == "busy" for s in mine)
            for _ in range(min(plan.replicas, busy + len(plan.queue)) - len(mine)):
                self.spawn(plan)

    def spawn(self, plan: ModelPlan) -> None:
        plan.serial += 1
        handle = remote_actor_class().options(**plan.options).remote(plan.model, plan.backend)
        slot = Slot(plan, f"{plan.name}#{plan.serial}", handle, handle.ready.remote(), time.monotonic())
        self.slots.append(slot)

    def drop(self, slot: Slot) -> None:
        """Kill an actor (frees its resources); a no-op for one that is already gone."""
        if slot in self.slots:
            self.slots.remove(slot)
        slot.state = "gone"
        try:
            ray.kill(slot.handle, no_restart=True)
        except Exception:  # noqa: BLE001 - already dead or unreachable
            pass

    def assign(self, slot: Slot, group: Group) -> None:
        group.attempt += 1
        self.tokens += 1
        now = time.monotonic()
        slot.group, slot.token, slot.state = group, f"g{self.tokens}", "busy"
        slot.started = slot.last_sample = now
        slot.group_samples, slot.progress_ref = 0, None
        slot.history.clear()
        context = {**self.context, "attempt": group.attempt}
        slot.ref = slot.handle.run_group.remote(group.configs, context, slot.token)
        for cell_id in group.cell_ids:
            self.record(cell_id, "running", None)

    # -- waiting

    def wait(self) -> None:
        """Wait up to `poll_s` for a group result or an actor start, then handle whatever is ready."""
        refs = {s.ref: s for s in self.slots if s.state == "busy"}
        refs.update({s.ready_ref: s for s in self.slots if s.state == "starting"})
        if not refs:
            time.sleep(self.conf.poll_s)
            return
        ready, _ = ray.wait(list(refs), num_returns=1, timeout=self.conf.poll_s)
        if ready:
            ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=0)
        for ref in ready:
            slot = refs[ref]
            if slot.state == "starting":
                self.on_ready(slot, ref)
            elif slot.state == "busy":
                self.on_result(slot, ref)

    def on_ready(self, slot: Slot, ref: Any) -> None:
        try:
            info = ray.get(ref, timeout=self.conf.poll_s)
        except RayError as exc:
            self.drop(slot)
            self.start_failed(slot.plan, exc)
            return
        slot.node_id, slot.actor_id, slot.state = info["node_id"], info["actor_id"], "idle"
        log.debug("%s ready on %s (%s)", slot.name, info["host"], slot.node_id)

    def on_result(self, slot: Slot, ref: Any) -> None:
        group, slot.group, slot.ref = slot.group, None, None
        assert group is not None
        try:
            outcomes = ray.get(ref, timeout=self.conf.poll_s)
        except RayTaskError as exc:  # the group raised inside a healthy actor: its cells fail, nothing else
            slot.state = "idle"
            self.fail_group(group, task_error(exc))
            return
        except RayError as exc:  # the actor or its node died: not the cells' fault, run them again
            self.drop(slot)
            self.retry(group, f"actor {slot.name} on node {slot.node_id[:12]} died: {short_error(exc, 300)}")
            return
        slot.state = "idle"
        for outcome in outcomes:  # "cached" here: finished by an earlier attempt of this sweep
            status = "done" if outcome["status"] == "cached" else outcome["status"]
            self.record(outcome["cell_id"], status, outcome.get("error"))
        if not self.conf.reuse_models:
            self.drop(slot)

    def poll_progress(self) -> None:
        """Ask busy actors how many samples they finished (never blocks)."""
        busy = [s for s in self.slots if s.state == "busy"]
        for slot in busy:
            if slot.progress_ref is None:
                slot.progress_ref = slot.handle.progress.remote()
        refs = {s.progress_ref: s for s in busy}
        if not refs:
            return
        ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=0)
        now = time.monotonic()
        for ref in ready:
            slot = refs[ref]
            slot.progress_ref = None
            try:
                report = ray.get(ref, timeout=self.conf.poll_s)
            except RayError:
                continue  # a dead actor shows up through its group's result
            if report["token"] == slot.token:
                slot.observe(int(report["group_samples"]), now)

    def check_timeouts(self) -> None:
        now = time.monotonic()
        if any(s.state == "busy" for s in self.slots):
            self.last_busy = now
        for slot in list(self.slots):
            waited = now - max(slot.created, self.last_busy)  # nothing running could free resources
            if slot.state == "busy":
                self.check_busy(slot, now)
            elif slot.state == "starting" and waited > self.conf.start_timeout_s:
                self.drop(slot)
                self.fail_plan(slot.plan, self.unplaceable(slot.plan))

    def unplaceable(self, plan: ModelPlan) -> str:
        wanted = {k: v for k, v in plan.options.items() if k in ("num_cpus", "num_gpus", "memory")}
        return (
            f"no actor for {plan.name} could be placed within {self.conf.start_timeout_s:g} s "
            f"(wants {wanted}; free: {ray.available_resources()})"
        )

    def check_busy(self, slot: Slot, now: float) -> None:
        if now - slot.started > self.conf.group_timeout_s:
            reason = f"group timed out after {self.conf.group_timeout_s:g} s"
        elif now - slot.last_sample > self.conf.stall_timeout_s:
            reason = f"no sample finished for {self.conf.stall_timeout_s:g} s"
        else:
            return
        group = slot.group
        assert group is not None
        self.drop(slot)
        self.retry(group, f"{slot.name}: {reason}")

    # -- failures

    def retry(self, group: Group, reason: str) -> None:
        group.errors.append(reason)
        if group.attempt > self.conf.group_retries:
            self.fail_group(group, f"gave up after {group.attempt} attempt(s); last: {reason}")
            return
        log.warning("%s; requeueing %d cell(s) (attempt %d done)", reason, len(group.cell_ids), group.attempt)
        group.plan.queue.appendleft(group)
        for cell_id in group.cell_ids:
            self.record(cell_id, "pending", None)

    def start_failed(self, plan: ModelPlan, exc: BaseException) -> None:
        plan.start_failures += 1
        log.warning("an actor for %s failed to start: %s", plan.name, short_error(exc, 300))
        if plan.start_failures > self.conf.group_retries:
            self.fail_plan(plan, f"actors for {plan.name} failed to start: {short_error(exc)}")

    def fail_plan(self, plan: ModelPlan, error: str) -> None:
        while plan.queue:
            self.fail_group(plan.queue.popleft(), error)

    def fail_group(self, group: Group, error: str) -> None:
        """Mark the group's unfinished cells failed (in their cell.json too)."""
        for config, cell_id in zip(group.configs, group.cell_ids, strict=True):
            store = CellStore(config["results_dir"], config)
            if store.is_done():
                self.record(cell_id, "done", None)
                continue
            store.write_meta(status="failed", error=error, attempt=group.attempt, **self.context)
            self.record(cell_id, "failed", error)

    def abort(self, reason: str) -> None:
        for slot in [s for s in self.slots if s.state == "busy"]:
            assert slot.group is not None
            self.fail_group(slot.group, reason)
            self.drop(slot)
        for plan in self.plans:
            self.fail_plan(plan, reason)

    # -- display

    def actor_rows(self) -> list[dict[str, Any]]:
        return [
            {
                "name": s.name,
                "node": s.node_id[:8] or "-",
                "state": s.state,
                "cells": len(s.group.cell_ids) if s.group else 0,
                "samples": s.group_samples,
                "of": s.group.n_samples if s.group else 0,
                "rate": s.rate(),
            }
            for s in self.slots
        ]

    def eta(self) -> float | None:
        """Seconds left at the current total rate (queued samples plus what busy actors have left)."""
        busy = [s for s in self.slots if s.state == "busy" and s.group is not None]
        rate = sum(s.rate() for s in busy)
        remaining = sum(g.n_samples for p in self.plans for g in p.queue)
        remaining += sum(max(0, s.group.n_samples - s.group_samples) for s in busy if s.group)
        return remaining / rate if rate > 0 else None


# ---------------------------------------------------------------------------------------- display


def fmt_eta(eta: float | None) -> str:
    if eta is None:
        return "ETA -"
    minutes, seconds = divmod(int(eta), 60)
    hours, minutes = divmod(minutes, 60)
    return f"ETA {hours}:{minutes:02d}:{seconds:02d}"


class Display:
    """Progress as log lines (for logs, CI and non-terminals); `RichDisplay` draws it live."""

    def __init__(self, counts: Callable[[], dict[str, int]], total: int, every_s: float) -> None:
        self.counts = counts
        self.total = total
        self.every_s = every_s
        self.last = 0.0

    def start(self) -> None:
        self.last = time.monotonic()

    def line(self, actors: list[dict[str, Any]], eta: float | None) -> str:
        c = self.counts()
        finished = c["done"] + c["cached"] + c["failed"]
        busy = ", ".join(f"{a['name']}@{a['node']} {a['rate']:.2f}/s" for a in actors if a["state"] == "busy")
        return (
            f"cells {finished}/{self.total} (done {c['done']}, cached {c['cached']}, failed {c['failed']}) "
            f"| {fmt_eta(eta)} | actors: {busy or 'starting/idle'}"
        )

    def update(self, actors: list[dict[str, Any]], eta: float | None) -> None:
        if self.every_s > 0 and time.monotonic() - self.last >= self.every_s:
            self.last = time.monotonic()
            log.info(self.line(actors, eta))

    def stop(self) -> None:
        pass


class RichDisplay(Display):
    """A live display: overall cells done/total with failures and ETA, one row per actor."""

    def start(self) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            refresh_per_second=4,
        )
        self.overall = self.progress.add_task("cells", total=self.total, info="")
        self.rows: dict[str, Any] = {}
        self.progress.start()

    def update(self, actors: list[dict[str, Any]], eta: float | None) -> None:
        c = self.counts()
        info = f"[red]{c['failed']} failed[/] · {c['cached']} cached · {fmt_eta(eta)}"
        self.progress.update(self.overall, completed=c["done"] + c["cached"] + c["failed"], info=info)
        names = {a["name"] for a in actors}
        for name in [n for n in self.rows if n not in names]:
            self.progress.remove_task(self.rows.pop(name))
        for a in actors:
            if a["name"] not in self.rows:
                self.rows[a["name"]] = self.progress.add_task("", total=None, info="")
            info = f"{a['rate']:.2f} samples/s · {a['cells']} cells" if a["state"] == "busy" else a["state"]
            self.progress.update(
                self.rows[a["name"]],
                description=f"  {a['name']} @{a['node']}",
                completed=a["samples"],
                total=a["of"] or None,
                info=info,
            )

    def stop(self) -> None:
        self.progress.stop()


class NullDisplay(Display):
    def update(self, actors: list[dict[str, Any]], eta: float | None) -> None:
        pass


def make_display(kind: str, counts: Callable[[], dict[str, int]], total: int, every_s: float) -> Display:
    if kind == "auto":
        kind = "rich" if sys.stdout.isatty() else "log"
    classes = {"rich": RichDisplay, "log": Display, "none": NullDisplay}
    if kind not in classes:
        raise ValueError(f"hydra.launcher.progress must be auto, rich, log or none, got {kind!r}")
    return classes[kind](counts, total, every_s)


# ------------------------------------------------------------------------------------------- sweep


class Sweep:
    """One `launch` call: jobs -> cells -> groups on actors -> cell.json, sweep.json, JobReturns."""

    def __init__(self, launcher: MmflowLauncher, job_overrides: Sequence[Sequence[str]], initial_idx: int):
        assert launcher.config is not None and launcher.hydra_context is not None
        self.started = time.time()
        self.launcher = launcher
        self.conf: MmflowLauncherConf = launcher.conf
        self.config: DictConfig = launcher.config
        self.sweep_dir = Path(str(self.config.hydra.sweep.dir)).resolve()
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        self.jobs = [self.compose(initial_idx + i, list(o)) for i, o in enumerate(job_overrides)]
        self.cells: dict[str, dict[str, Any]] = {}
        for job in self.jobs:
            if job.cell is not None:
                self.cells.setdefault(job.cell_id, job.cell)
        self.status: dict[str, str] = {}
        self.errors: dict[str, str] = {}
        self.driver = this_process()  # lets a later run tell a killed driver's `running` record

    # -- composition

    def compose(self, idx: int, overrides: list[str]) -> Job:
        assert self.launcher.hydra_context is not None
        config = self.launcher.hydra_context.config_loader.load_sweep_config(self.config, overrides)
        with open_dict(config):
            config.hydra.job.id = idx
            config.hydra.job.num = idx
        job = Job(idx, overrides, config)
        task_cfg = copy.deepcopy(config)
        with open_dict(task_cfg):
            del task_cfg["hydra"]
        previous = HydraConfig.instance().cfg
        HydraConfig.instance().set_config(config)
        try:
            cell = cell_config(task_cfg)
            job.cell, job.cell_id = cell, CellStore(cell["results_dir"], cell).id
            validate_cell(cell)  # each cell on its own, before any model loads
        except CellConfigError as exc:  # this cell fails alone, with the key named
            job.invalid = f"{type(exc).__name__}: {exc}"
        except Exception as exc:  # an unresolvable config fails its own job, not the sweep
            job.error = f"{type(exc).__name__}: {short_error(exc)}"
        finally:
            HydraConfig.instance().cfg = previous
        return job

    @property
    def name(self) -> str:
        return str(self.config.get("sweep_name") or self.config.hydra.job.config_name)

    def context(self) -> dict[str, Any]:
        """What every cell.json of this sweep records about the sweep."""
        return {"sweep_name": self.name, "sweep_dir": str(self.sweep_dir)}

    # -- running

    def run(self) -> list[JobReturn]:
        redact_hydra_files(self.sweep_dir)  # multirun.yaml, saved by Hydra's sweeper before us
        mark_stale_sweeps(self.sweep_dir.parent, self.sweep_dir)
        try:
            with sigterm_as_interrupt():
                return self._run()
        finally:
            redact_hydra_files(self.sweep_dir)  # the jobs' .hydra folders

    def _run(self) -> list[JobReturn]:
        for cell_id, cell in self.cells.items():
            self.status[cell_id] = "cached" if CellStore(cell["results_dir"], cell).is_done() else "pending"
        for job in (j for j in self.jobs if j.invalid and j.cell is not None):
            CellStore(job.cell["results_dir"], job.cell).write_meta(
                status="failed", error=job.invalid, **self.context()
            )
            self.status[job.cell_id], self.errors[job.cell_id] = "failed", job.invalid
        todo = {cid: cell for cid, cell in self.cells.items() if self.status[cid] == "pending"}
        log.info(
            "mmflow sweep '%s': %d jobs, %d cells (%d finished before, %d to compute) -> %s",
            *(self.name, len(self.jobs), len(self.cells), len(self.cells) - len(todo), len(todo)),
            self.sweep_dir,
        )
        self.write_sweep_json("running")
        try:
            if todo:
                self.compute(todo)
        except BaseException as exc:
            interrupted = isinstance(exc, KeyboardInterrupt)
            self.write_sweep_json("interrupted" if interrupted else "error", error=short_error(exc))
            log.warning("sweep stopped: re-run the same command to resume (finished samples are kept)")
            raise
        state = "failed" if self.failed_ids() or any(j.error for j in self.jobs) else "done"
        self.write_sweep_json(state)
        returns = self.job_returns()
        print_summary(self)
        self.publish()
        return returns

    def publish(self) -> None:
        """The sweep-level W&B run and the HTML report; their failure never fails the sweep."""
        from mmflow.report import build_report
        from mmflow.wandb_logger import log_sweep

        cell_dirs = [Path(cell["results_dir"]) / cid for cid, cell in self.cells.items()]
        logger_cfg = (
            OmegaConf.to_container(self.config.get("logger"), resolve=True)
            if "logger" in self.config
            else None
        )
        try:
            log_sweep(self.sweep_dir, cell_dirs, logger_cfg)
        except Exception as exc:  # outputs only: the cells are already safe on disk
            log.warning("sweep-level W&B run failed: %s", short_error(exc))
        try:
            print(f"[mmflow] report: {build_report(self.sweep_dir, cell_dirs=cell_dirs)}")
        except Exception as exc:
            log.warning(
                "report failed: %s (run `python -m mmflow.report %s`)", short_error(exc), self.sweep_dir
            )

    def compute(self, todo: dict[str, dict[str, Any]]) -> None:
        ray_cfg = OmegaConf.to_container(self.config.get("ray") or OmegaConf.create({}), resolve=True)
        assert isinstance(ray_cfg, dict)
        with ray_session(ray_cfg):
            plans = make_groups(todo, self.conf.reuse_models, self.conf)
            limits = cluster_limits()
            scheduler = Scheduler(self.conf, plans, self.record, self.context())
            for plan in plans:
                try:
                    plan.options = actor_options(plan, self.conf, limits)
                except ValueError as exc:
                    scheduler.fail_plan(plan, str(exc))
            display = make_display(self.conf.progress, self.counts, len(self.cells), self.conf.log_every_s)
            display.start()
            try:
                scheduler.run(display)
            finally:
                display.stop()

    def record(self, cell_id: str, status: str, error: str | None) -> None:
        previous = self.status.get(cell_id)
        self.status[cell_id] = status
        if error:
            self.errors[cell_id] = error
        if status in FINAL and previous not in FINAL:
            level = logging.WARNING if status == "failed" else logging.DEBUG
            log.log(level, "cell %s %s%s", cell_id, status, f": {error.splitlines()[0]}" if error else "")
            self.write_sweep_json("running")

    def counts(self) -> dict[str, int]:
        values = list(self.status.values())
        return {s: values.count(s) for s in ("done", "cached", "failed", "running", "pending")}

    def failed_ids(self) -> list[str]:
        return [cid for cid, status in self.status.items() if status == "failed"]

    # -- outputs

    def write_sweep_json(self, state: str, error: str | None = None) -> None:
        jobs_of: dict[str, list[int]] = {}
        for job in self.jobs:
            if job.cell is not None:
                jobs_of.setdefault(job.cell_id, []).append(job.idx)
        cells = []
        for cell_id, cell in self.cells.items():
            entry = {"cell_id": cell_id, "status": self.status.get(cell_id, "pending"), **labels(cell)}
            entry.update(path=str(Path(cell["results_dir"]) / cell_id), jobs=jobs_of[cell_id])
            if cell_id in self.errors and entry["status"] == "failed":
                entry["error"] = self.errors[cell_id]
            cells.append(entry)
        payload = {
            "sweep_name": self.name,
            "sweep_dir": str(self.sweep_dir),
            "status": state,
            "driver": self.driver,
            "error": error,
            "started": datetime.fromtimestamp(self.started).isoformat(timespec="seconds"),
            "wall_seconds": round(time.time() - self.started, 3),
            "launcher": asdict(self.conf),
            "counts": self.counts(),
            "cells": cells,
            "failed": self.failed_ids(),
            "invalid_jobs": [
                {"job": j.idx, "overrides": redact(j.overrides), "error": j.error}
                for j in self.jobs
                if j.error
            ],
        }
        atomic_write_json(self.sweep_dir / "sweep.json", payload)

    def job_returns(self) -> list[JobReturn]:
        """A `JobReturn` per job, with Hydra's per-job folder; failed cells make failed returns."""
        assert self.launcher.hydra_context is not None
        returns = []
        for job in self.jobs:
            returns.append(
                run_job(
                    hydra_context=self.launcher.hydra_context,
                    task_function=functools.partial(self.job_result, job),
                    config=job.config,
                    job_dir_key="hydra.sweep.dir",
                    job_subdir_key="hydra.sweep.subdir",
                )
            )
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        return returns

    def job_result(self, job: Job, _cfg: DictConfig) -> dict[str, Any]:
        overrides = " ".join(redact(filter_overrides(job.overrides)))
        if job.error is not None or job.cell is None:
            raise CellFailed(f"job #{job.idx} ({overrides}) has no valid cell config: {job.error}")
        status = self.status.get(job.cell_id, "pending")
        path = str(Path(job.cell["results_dir"]) / job.cell_id)
        if status != "done" and status != "cached":
            error = (self.errors.get(job.cell_id) or "did not finish").splitlines()[0]
            raise CellFailed(f"cell {job.cell_id} ({overrides}) {status}: {error}")
        return {"cell_id": job.cell_id, "status": status, "path": path}


def labels(cell: dict[str, Any]) -> dict[str, Any]:
    """What a person reads to recognise a cell (its analysis's `Labels`)."""
    from mmflow.analyses import analysis_for

    names = analysis_for(cell).labels
    return {
        "model": cell["model"]["name"],
        "task": cell.get("task"),
        "variant": names.variant,
        "window": names.window,
    }


def print_summary(sweep: Sweep) -> None:
    """The final table of cells (status, time, headline numbers) and where everything is."""
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 160)
    table = Table(title=f"mmflow sweep '{sweep.name}'", show_lines=False)
    for column in ("cell", "model", "task", "analysis", "window", "status", "time s", "headline", "node"):
        table.add_column(column, no_wrap=column in ("cell", "status"))
    styles = {"done": "green", "cached": "cyan", "failed": "bold red"}
    for cell_id, cell in sweep.cells.items():
        meta = CellStore(cell["results_dir"], cell).read_meta()
        status = sweep.status.get(cell_id, "pending")
        seconds = (meta.get("timings") or {}).get("group_seconds")
        row = labels(cell)
        table.add_row(
            cell_id,
            row["model"],
            str(row["task"]),
            str(row["variant"]),
            str(row["window"] if row["window"] is not None else "-"),
            f"[{styles.get(status, 'yellow')}]{status}[/]",
            f"{seconds:.1f}" if isinstance(seconds, int | float) else "-",
            headline_text(meta.get("headline") or {}) if status in ("done", "cached") else "-",
            str(meta.get("node_id") or "-")[:8],
        )
    console.print(table)
    counts = sweep.counts()
    console.print(
        f"{counts['done']} done, {counts['cached']} cached, {counts['failed']} failed "
        f"in {time.time() - sweep.started:.1f} s. Sweep folder: {sweep.sweep_dir}"
    )
    for cell_id in sweep.failed_ids():
        error = (sweep.errors.get(cell_id) or "?").splitlines()[0]
        name = "/".join(str(v) for v in labels(sweep.cells[cell_id]).values())
        console.print(f"[bold red]FAILED[/] {cell_id} ({name}): {error}")
    for job in (j for j in sweep.jobs if j.error):
        console.print(f"[bold red]INVALID[/] job #{job.idx} {' '.join(redact(job.overrides))}: {job.error}")


def headline_text(headline: dict[str, Any]) -> str:
    parts = []
    for key, value in headline.items():
        parts.append(f"{key}={value:.3g}" if isinstance(value, float) else f"{key}={value}")
    return " ".join(parts)


def launch(
    launcher: MmflowLauncher, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
) -> list[JobReturn]:
    """The launcher's entry point (see the module docstring)."""
    assert launcher.config is not None
    setup_globals()
    configure_log(launcher.config.hydra.hydra_logging, launcher.config.hydra.verbose)
    return Sweep(launcher, job_overrides, initial_job_idx).run()
