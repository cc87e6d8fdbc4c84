"""The driver's side of `mmflow.storage.relay`: it locks a relayed batch's cells, seeds the actor with what
they have, writes every file the actor hands over (in order, atomically) and releases the locks."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmflow.storage.files import atomic_write_bytes
from mmflow.storage.locks import CellLock, describe, lock_wait_s
from mmflow.storage.objectstore import sync
from mmflow.storage.relay import Op, safe_name
from mmflow.storage.store import CellStore

if TYPE_CHECKING:
    from mmflow.config.spec import CellSpec

SEEDED = ("cell.json",)  # with every parts/samples-*.parquet and parts/results-*.parquet


@dataclass
class DriverBatch:
    """The driver's side of one relayed cell batch: locks, seeds, cached cells, applied writes."""

    dirs: dict[str, Path]  # cell id -> the real cell folder
    configs: list[CellSpec | dict]  # the cells sent to the actor
    seeds: dict[str, dict[str, bytes]]
    outcomes: list[dict[str, Any]]  # cells settled here: cached, or locked by another process
    locks: list[CellLock] = field(default_factory=list)
    ops: int = 0
    bytes: int = 0
    apply_s: float = 0.0

    @classmethod
    def open(cls, configs: Sequence[CellSpec | dict], wait_s: float | None = None) -> DriverBatch:
        """Lock each cell folder; a finished cell is `cached` and not sent; seed the others.

        A cell another process computes is waited for (up to `wait_s`, default `lock_wait_s()`), as
        a worker would; the driver blocks meanwhile (busy actors wait for it to drain them). Locks
        are taken in cell-id order, so two drivers never wait for each other.
        """
        batch = cls({}, [], {}, [])
        wait = lock_wait_s() if wait_s is None else wait_s
        cells = {CellStore.of(c).id: c for c in configs}
        stores = sorted((CellStore.of(c) for c in configs), key=lambda s: s.id)
        for store in stores:
            lock = CellLock(store.dir)
            if not lock.acquire(0.0):
                owner = describe(lock.owner())
                print(f"[mmflow] cell {store.id} is being computed by {owner}; waiting up to {wait:g} s")
                if not lock.acquire(wait):
                    error = f"not computed here: {owner} still holds {store.dir / '.lock'} after {wait:g} s"
                    batch.outcomes.append(outcome(store.id, "failed", store.dir, error))
                    continue
            if store.is_done():
                lock.release()
                batch.outcomes.append(outcome(store.id, "cached", store.dir))
                continue
            batch.locks.append(lock)
            batch.dirs[store.id] = store.dir
            batch.configs.append(cells[store.id])
            batch.seeds[store.id] = seed_files(store.dir)
        return batch

    def apply(self, ops: list[Op]) -> None:
        """Replay the actor's writes on the real cell folders, in order."""
        started = time.monotonic()
        for kind, cell_id, name, payload in ops:
            folder = self.dirs[cell_id]
            if kind == "write":
                atomic_write_bytes(folder / safe_name(name), payload)
                self.bytes += len(payload)
            elif kind == "move":
                source = folder / safe_name(name)
                if source.exists():
                    target = folder / safe_name(payload)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(source, target)
                    sync(target, source)
            elif kind == "clear_parts":
                parts = folder / "parts"
                removed = list(parts.glob("*"))
                for path in removed:
                    path.unlink()
                if parts.exists():
                    parts.rmdir()
                sync(*removed)
            else:
                raise ValueError(f"unknown relayed operation {kind!r}")
            self.ops += 1
        self.apply_s += time.monotonic() - started

    def settle(self, outcomes: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The actor's outcomes with the real folders, plus the cells settled here."""
        fixed = [{**o, "path": str(self.dirs.get(o["cell_id"], o.get("path")))} for o in outcomes]
        return [*self.outcomes, *fixed]

    def close(self) -> None:
        for lock in self.locks:
            lock.release()
        self.locks = []


def seed_files(cell_dir: Path) -> dict[str, bytes]:
    """What an actor needs of a cell folder to resume it: `cell.json` and the finished samples' parts."""
    files = {name: (cell_dir / name).read_bytes() for name in SEEDED if (cell_dir / name).exists()}
    for pattern in ("samples-*.parquet", "results-*.parquet"):
        for path in sorted((cell_dir / "parts").glob(pattern)):
            files[f"parts/{path.name}"] = path.read_bytes()
    return files


def outcome(cell_id: str, status: str, path: Path, error: str | None = None) -> dict[str, Any]:
    return {"cell_id": cell_id, "status": status, "path": str(path), "error": error, "summary": {}}
