"""Planning: the cells to compute per model, then in cell batches that share samples.

A *cell batch* is the set of cells one worker computes together: they share model, data, task and
samples (`mmflow.storage.store.batch_key`), so each sample gets one clean pass for all of them. A model
plan holds a model's config, the worker options the executor chose, and its queue of batches.
"""

from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from mmflow.storage.store import batch_key
from mmflow.sweep.settings import SweepSettings


@dataclass
class CellBatch:
    """Cells computed together on one worker (one clean pass per sample for all of them)."""

    plan: ModelPlan
    configs: list[dict[str, Any]]
    cell_ids: list[str]
    attempt: int = 0  # how many times it was handed to a worker
    errors: list[str] = field(default_factory=list)  # why earlier attempts ended

    @property
    def n_samples(self) -> int:
        return int(self.configs[0].get("n_samples", 0))


@dataclass
class ModelPlan:
    """Everything the scheduler knows about one model: config, worker options, queue of batches."""

    key: str
    name: str
    model: dict[str, Any]
    backend: str  # the attention implementation the model is loaded with
    replicas: int
    options: dict[str, Any] = field(default_factory=dict)  # the executor's (e.g. Ray actor options)
    queue: deque[CellBatch] = field(default_factory=deque)
    serial: int = 0  # workers started so far (names them)
    start_failures: int = 0


def attention_backend(cell: dict[str, Any]) -> str:
    return str(cell["engine"]["attention"])


def model_key(cell: dict[str, Any]) -> str:
    """Cells with the same key can run on the same loaded model."""
    return json.dumps([cell["model"], attention_backend(cell)], sort_keys=True, default=str)


def plan_models(cells: dict[str, dict[str, Any]], settings: SweepSettings) -> list[ModelPlan]:
    """Model plans, each with its queue of cell batches, in the order of `cells` (cell id -> config)."""
    plans: dict[str, ModelPlan] = {}
    batches: dict[tuple[str, str], CellBatch] = {}
    for cell_id, cell in cells.items():
        key = model_key(cell)
        if key not in plans:
            name = cell["model"]["name"]
            replicas = int(settings.models.get(name, {}).get("replicas", settings.replicas))
            plans[key] = ModelPlan(key, name, cell["model"], attention_backend(cell), max(1, replicas))
        plan = plans[key]
        shared = (key, batch_key(cell) if settings.reuse_models else cell_id)
        if shared not in batches:
            batches[shared] = CellBatch(plan, [], [])
            plan.queue.append(batches[shared])
        batches[shared].configs.append(cell)
        batches[shared].cell_ids.append(cell_id)
    return list(plans.values())
