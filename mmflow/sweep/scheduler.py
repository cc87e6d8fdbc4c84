"""The scheduler: hand queued cell batches to idle workers, watch them, requeue what a lost one held.

It drives any `Executor` and knows nothing of Ray. Every wait has a timeout: a worker that cannot be
placed, a batch that runs too long or stops finishing samples, and the whole sweep. A batch whose
worker is lost, hangs or times out goes back to the front of its model's queue and runs on a fresh
worker (its cells resume from their part files) up to `batch_retries` times; a batch that raises
fails its own cells only.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mmflow.execution.context import RunContext
from mmflow.storage.store import CellStore
from mmflow.sweep.executor import Event, Executor
from mmflow.sweep.plan import CellBatch, ModelPlan
from mmflow.sweep.settings import SweepSettings

log = logging.getLogger(__name__)

Record = Callable[[str, str, "str | None"], None]  # (cell id, status, error)


@dataclass
class Slot:
    """One worker as the scheduler sees it: starting, idle or busy with a batch."""

    plan: ModelPlan
    name: str
    created: float
    state: str = "starting"
    node_id: str = ""
    batch: CellBatch | None = None
    started: float = 0.0
    last_sample: float = 0.0
    samples: int = 0
    history: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=40))

    def observe(self, samples: int, now: float) -> None:
        if samples > self.samples:
            self.last_sample = now
        self.samples = samples
        self.history.append((now, samples))

    def rate(self, now: float, window_s: float = 20.0) -> float:
        """Samples per second over the recent past."""
        points = [(t, n) for t, n in self.history if now - t <= window_s]
        if len(points) < 2 or points[-1][0] <= points[0][0]:
            return 0.0
        return (points[-1][1] - points[0][1]) / (points[-1][0] - points[0][0])


class Scheduler:
    """Runs the plans' batches on `executor`; reports every cell's status through `record`."""

    def __init__(
        self,
        settings: SweepSettings,
        plans: list[ModelPlan],
        executor: Executor,
        record: Record,
        context: RunContext,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.plans = plans
        self.executor = executor
        self.record = record
        self.context = context
        self.clock = clock
        self.slots: list[Slot] = []
        self.started = self.last_busy = clock()

    def run(self, on_tick: Callable[[Scheduler], None] | None = None) -> None:
        """Until every batch has ended (or the sweep timeout); all workers are cancelled at the end."""
        for plan_key, error in self.executor.prepare(self.plans).items():
            self.fail_plan(next(p for p in self.plans if p.key == plan_key), error)
        deadline = self.started + self.settings.timeout_s
        try:
            while self.has_work():
                if self.clock() > deadline:
                    self.abort(f"sweep timeout ({self.settings.timeout_s:g} s) reached; re-run to resume")
                    break
                self.fill()
                for event in self.executor.poll(self.settings.poll_s):
                    self.handle(event)
                self.poll_progress()
                self.check_timeouts()
                if on_tick is not None:
                    on_tick(self)
        finally:
            for slot in list(self.slots):
                self.drop(slot)

    def has_work(self) -> bool:
        return any(p.queue for p in self.plans) or any(s.state == "busy" for s in self.slots)

    # -- workers

    def fill(self) -> None:
        """Give idle workers work, release workers whose model has none left, start missing ones."""
        for plan in self.plans:
            for slot in [s for s in self.slots if s.plan is plan]:
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
        slot = Slot(plan, f"{plan.name}#{plan.serial}", self.clock())
        self.slots.append(slot)
        self.executor.start(slot.name, plan)

    def drop(self, slot: Slot) -> None:
        """Cancel a worker (frees its resources)."""
        if slot in self.slots:
            self.slots.remove(slot)
        slot.state = "gone"
        self.executor.cancel(slot.name)

    def assign(self, slot: Slot, batch: CellBatch) -> None:
        batch.attempt += 1
        now = self.clock()
        slot.batch, slot.state = batch, "busy"
        slot.started = slot.last_sample = now
        slot.samples = 0
        slot.history.clear()
        for cell_id in batch.cell_ids:
            self.record(cell_id, "running", None)
        self.executor.submit(slot.name, batch, self.context.replace(attempt=batch.attempt))

    # -- events

    def slot(self, name: str) -> Slot | None:
        return next((s for s in self.slots if s.name == name), None)

    def handle(self, event: Event) -> None:
        slot = self.slot(event.worker)
        if slot is None:  # an event from a worker already dropped
            return
        if event.kind == "ready":
            slot.state, slot.node_id = "idle", str(event.info.get("node_id") or "")
        elif event.kind == "start_failed":
            self.drop(slot)
            self.start_failed(slot.plan, event.error or "?")
        else:
            self.batch_ended(slot, event)

    def batch_ended(self, slot: Slot, event: Event) -> None:
        batch, slot.batch = slot.batch, None
        if batch is None:
            return
        if event.kind == "lost":  # not the cells' fault: run them again
            self.drop(slot)
            self.retry(batch, f"worker {slot.name} on node {slot.node_id[:12]} died: {event.error}")
            return
        slot.state = "idle"
        if event.kind == "batch_failed":
            self.fail_batch(batch, event.error or "?")
            return
        for outcome in event.outcomes:
            # "cached" on a retry: finished by an earlier attempt of this sweep (done here); on a first
            # attempt: finished meanwhile by another process that held the cell's lock (cached)
            status = outcome["status"]
            if status == "cached" and batch.attempt > 1:
                status = "done"
            self.record(outcome["cell_id"], status, outcome.get("error"))
        if not self.settings.reuse_models:
            self.drop(slot)

    def poll_progress(self) -> None:
        now = self.clock()
        for slot in [s for s in self.slots if s.state == "busy"]:
            samples = self.executor.progress(slot.name)
            if samples is not None:
                slot.observe(samples, now)

    def check_timeouts(self) -> None:
        now = self.clock()
        if any(s.state == "busy" for s in self.slots):
            self.last_busy = now
        for slot in list(self.slots):
            waited = now - max(slot.created, self.last_busy)  # nothing running could free resources
            if slot.state == "busy":
                self.check_busy(slot, now)
            elif slot.state == "starting" and waited > self.settings.start_timeout_s:
                self.drop(slot)
                self.fail_plan(slot.plan, self.unplaceable(slot.plan))

    def unplaceable(self, plan: ModelPlan) -> str:
        wanted = {k: v for k, v in plan.options.items() if k in ("num_cpus", "num_gpus", "memory")}
        return (
            f"no actor for {plan.name} could be placed within {self.settings.start_timeout_s:g} s "
            f"(wants {wanted}; free: {self.executor.free_resources()})"
        )

    def check_busy(self, slot: Slot, now: float) -> None:
        if now - slot.started > self.settings.batch_timeout_s:
            reason = f"cell batch timed out after {self.settings.batch_timeout_s:g} s"
        elif now - slot.last_sample > self.settings.stall_timeout_s:
            reason = f"no sample finished for {self.settings.stall_timeout_s:g} s"
        else:
            return
        batch = slot.batch
        assert batch is not None
        self.drop(slot)
        self.retry(batch, f"{slot.name}: {reason}")

    # -- failures

    def retry(self, batch: CellBatch, reason: str) -> None:
        batch.errors.append(reason)
        if batch.attempt > self.settings.batch_retries:
            self.fail_batch(batch, f"gave up after {batch.attempt} attempt(s); last: {reason}")
            return
        log.warning("%s; requeueing %d cell(s) (attempt %d done)", reason, len(batch.cell_ids), batch.attempt)
        batch.plan.queue.appendleft(batch)
        for cell_id in batch.cell_ids:
            self.record(cell_id, "pending", None)

    def start_failed(self, plan: ModelPlan, error: str) -> None:
        plan.start_failures += 1
        log.warning("a worker for %s failed to start: %s", plan.name, error)
        if plan.start_failures > self.settings.batch_retries:
            self.fail_plan(plan, f"actors for {plan.name} failed to start: {error}")

    def fail_plan(self, plan: ModelPlan, error: str) -> None:
        while plan.queue:
            self.fail_batch(plan.queue.popleft(), error)

    def fail_batch(self, batch: CellBatch, error: str) -> None:
        """Mark the batch's unfinished cells failed (in their cell.json too)."""
        context = self.context.replace(attempt=batch.attempt)
        for spec, cell_id in zip(batch.specs, batch.cell_ids, strict=True):
            store = CellStore.of(spec)
            if store.is_done():
                self.record(cell_id, "done", None)
                continue
            store.write_meta(status="failed", error=error, **context.meta())
            self.record(cell_id, "failed", error)

    def abort(self, reason: str) -> None:
        for slot in [s for s in self.slots if s.state == "busy"]:
            assert slot.batch is not None
            self.fail_batch(slot.batch, reason)
            self.drop(slot)
        for plan in self.plans:
            self.fail_plan(plan, reason)

    # -- what the display shows

    def worker_rows(self) -> list[dict[str, Any]]:
        now = self.clock()
        return [
            {
                "name": s.name,
                "node": s.node_id[:8] or "-",
                "state": s.state,
                "cells": len(s.batch.cell_ids) if s.batch else 0,
                "samples": s.samples,
                "of": s.batch.n_samples if s.batch else 0,
                "rate": s.rate(now),
            }
            for s in self.slots
        ]

    def eta(self) -> float | None:
        """Seconds left at the current total rate (queued samples plus what busy workers have left)."""
        now = self.clock()
        busy = [s for s in self.slots if s.state == "busy" and s.batch is not None]
        rate = sum(s.rate(now) for s in busy)
        remaining = sum(b.n_samples for p in self.plans for b in p.queue)
        remaining += sum(max(0, s.batch.n_samples - s.samples) for s in busy if s.batch)
        return remaining / rate if rate > 0 else None
