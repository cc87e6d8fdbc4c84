"""What a run records about where and how it ran, next to each cell's results (`cell.json`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class RunContext:
    """Where a cell is computed: the sweep it belongs to, the attempt, and the worker that runs it.

    Every field is optional except `attempt`; `meta()` gives the fields that are known, which the
    runtime writes into `cell.json` (they are not part of the cell id).
    """

    sweep_name: str | None = None
    sweep_dir: str | None = None
    attempt: int = 1  # 1 for the first try of a cell batch, +1 for each requeue
    node_id: str | None = None  # Ray node (or "local" for the in-process executor)
    actor_id: str | None = None  # Ray actor, when the worker is one
    host: str | None = None
    pid: int | None = None
    model_loads: int | None = None  # weight loads the worker's process had done when the batch started

    def meta(self) -> dict[str, Any]:
        """The known fields as plain data (`cell.json` keys)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    def replace(self, **changes: Any) -> RunContext:
        return dataclasses.replace(self, **changes)
