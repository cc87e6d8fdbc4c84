"""Planning: the cells to compute per model, then in cell batches that share samples.

A *cell batch* is the set of cells one worker computes together: they share model, data, task and
samples (`mmflow.config.identity.batch_key`), so each sample gets one clean pass for all of them. A model
plan holds a model's config, the worker options the executor chose, and its queue of batches.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mmflow.config.identity import batch_key
from mmflow.sweep.settings import SweepSettings

if TYPE_CHECKING:
    from mmflow.config.spec import CellSpec


@dataclass
class CellBatch:
    """Cells computed together on one worker (one clean pass per sample for all of them)."""

    plan: ModelPlan
    specs: list[CellSpec]  # what the worker computes (`mmflow.execution.runtime.run_cells`)
    cell_ids: list[str]
    attempt: int = 0  # how many times it was handed to a worker
    errors: list[str] = field(default_factory=list)  # why earlier attempts ended

    @property
    def n_samples(self) -> int:
        return int(self.specs[0].n_samples or 0)


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


def model_key(spec: CellSpec) -> str:
    """Cells with the same key can run on the same loaded model."""
    return json.dumps([spec.config["model"], spec.engine.attention], sort_keys=True, default=str)


def plan_models(
    cells: Mapping[str, CellSpec | Mapping[str, Any]], settings: SweepSettings
) -> list[ModelPlan]:
    """Model plans, each with its queue of cell batches, in the order of `cells` (cell id -> spec; a
    plain resolved config is made a spec here)."""
    from mmflow.config.spec import CellSpec

    plans: dict[str, ModelPlan] = {}
    batches: dict[tuple[str, str], CellBatch] = {}
    for cell_id, cell in cells.items():
        spec = CellSpec.from_config(cell, check=False)
        key = model_key(spec)
        if key not in plans:
            name = spec.model.name
            replicas = int(settings.models.get(name, {}).get("replicas", settings.replicas))
            model = spec.config["model"]
            plans[key] = ModelPlan(key, name, model, spec.engine.attention, max(1, replicas))
        plan = plans[key]
        shared = (key, batch_key(spec.plain) if settings.reuse_models else cell_id)
        if shared not in batches:
            batches[shared] = CellBatch(plan, [], [])
            plan.queue.append(batches[shared])
        batches[shared].specs.append(spec)
        batches[shared].cell_ids.append(cell_id)
    return list(plans.values())
