"""Cell files sent to the driver instead of written on the worker's node (no shared disk needed).

With `hydra.launcher.write_results=driver` an actor computes a cell batch in a private scratch
folder seeded by the driver with each cell's `cell.json` and part files (so resume, `finish` and
every read work as usual). Each file the cell store writes there is also put, as bytes, on the
actor's bounded `Relay` queue; a writer blocks while the queue is full, so a slow driver slows the
actor down instead of piling rows up in memory. The driver drains the queue and replays every
operation, in order, on the real cell folder with the same atomic writes
(`mmflow.sweep.inbox.DriverBatch`),
holding each cell's lock while the batch runs. Files land byte for byte as a shared-disk run
writes them; whatever the actor had not yet handed over when it died is computed again.
"""

from __future__ import annotations

import queue
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path, PurePosixPath
from typing import Any

# One operation on a cell folder: (kind, cell_id, name, payload). kind: "write" (payload: bytes),
# "move" (payload: the destination name), "clear_parts"; names are relative to the cell folder.
Op = tuple[str, str, str, Any]

_CURRENT: ContextVar[Relay | None] = ContextVar("mmflow_relay", default=None)


class Relay:
    """The worker's side: where its cell stores live (`root`) and the bounded queue of their writes."""

    def __init__(self, root: Path, limit: int) -> None:
        self.root = Path(root)
        self.queue: queue.Queue[Op] = queue.Queue(maxsize=max(1, int(limit)))
        self.sent = 0
        self.blocked_s = 0.0  # time writers waited for room (back-pressure from the driver)

    def send(self, op: Op) -> None:
        started = time.monotonic()
        self.queue.put(op)  # blocks while `limit` operations wait for the driver
        self.blocked_s += time.monotonic() - started
        self.sent += 1

    def take(self, wait_s: float, max_ops: int) -> list[Op]:
        """Up to `max_ops` operations, waiting at most `wait_s` for the first one."""
        ops: list[Op] = []
        try:
            ops.append(self.queue.get(timeout=wait_s) if wait_s > 0 else self.queue.get_nowait())
            while len(ops) < max_ops:
                ops.append(self.queue.get_nowait())
        except queue.Empty:
            pass
        return ops


def current_relay() -> Relay | None:
    """The relay of the batch this thread computes, or None (files are written where they are)."""
    return _CURRENT.get()


@contextmanager
def relaying(relay: Relay, seeds: dict[str, dict[str, bytes]]) -> Iterator[Relay]:
    """Compute inside `relay.root`, seeded with the driver's files (cell id -> name -> bytes)."""
    for cell_id, files in seeds.items():
        for name, data in files.items():
            path = relay.root / cell_id / safe_name(name)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
    token = _CURRENT.set(relay)
    try:
        yield relay
    finally:
        _CURRENT.reset(token)
        shutil.rmtree(relay.root, ignore_errors=True)


def safe_name(name: str) -> str:
    """`name` if it is a plain relative path inside a cell folder, else ValueError."""
    path = PurePosixPath(name)
    if not name or path.is_absolute() or ".." in path.parts:
        raise ValueError(f"refusing a relayed path outside its cell folder: {name!r}")
    return str(path)
