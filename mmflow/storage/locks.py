"""Who computes what: per-cell locks, owner records, stale-record detection and exclusive folders.

A cell is computed by one process at a time: `CellLock` holds an OS file lock (`filelock`) on
`<cell>/.lock` while the cell runs; the OS releases it when the process dies, so a lock left by a
killed process is recovered by the next run. The owner (host, pid, start time) is recorded next to
it in `<cell>/.lock.owner.json` for messages and for file systems where OS locks are unreliable.

A recorded owner is the process with that pid *and* that start time (`started_at`, from psutil): a pid
the OS later gave to another process does not keep a dead owner's record alive.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from mmflow.errors import ConfigError

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"
OWNER_NAME = ".lock.owner.json"
# How long a run waits for a cell that another process is computing (then the cell is not computed
# here and says so). Seconds; the environment variable MMFLOW_LOCK_WAIT_S overrides it.
DEFAULT_LOCK_WAIT_S = 6 * 3600.0


def lock_wait_s() -> float:
    return float(os.environ.get("MMFLOW_LOCK_WAIT_S", DEFAULT_LOCK_WAIT_S))


# Two readings of one process's start time differ by less than this (seconds); psutil derives it
# from boot time and clock ticks.
START_TIME_TOLERANCE_S = 1.0


def process_started_at(pid: int) -> float | None:
    """The OS's start time of process `pid` (seconds since the epoch), None if there is none."""
    import psutil

    try:
        return float(psutil.Process(pid).create_time())
    except (psutil.Error, OSError, ValueError):
        return None


def this_process() -> dict[str, Any]:
    """Host, pid and start time of this process (recorded as the owner of what it writes).

    `since`: when this record was made, for people; `started_at`: the OS's start time of the process,
    which with the pid identifies it (`process_alive`).
    """
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started_at": process_started_at(os.getpid()),
        "since": datetime.now().isoformat(timespec="seconds"),
    }


def process_alive(owner: dict[str, Any] | None) -> bool | None:
    """Whether the recorded process still runs: None when it is on another host (cannot tell).

    A live process with the recorded pid but another start time is a different process (the pid was
    reused): the recorded one is gone. Records without `started_at` (older ones) are judged by pid.
    """
    if not owner or owner.get("host") != socket.gethostname() or not owner.get("pid"):
        return None
    pid = int(owner["pid"])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    recorded = owner.get("started_at")
    if isinstance(recorded, int | float):
        actual = process_started_at(pid)
        if actual is None:
            return False
        return abs(actual - float(recorded)) <= START_TIME_TOLERANCE_S
    return True


def describe(owner: dict[str, Any] | None) -> str:
    if not owner:
        return "an unknown process"
    return f"pid {owner.get('pid')} on {owner.get('host')} (since {owner.get('since', '?')})"


class CellLock:
    """The lock of one cell folder: `acquire(timeout_s)` -> bool, `release()`, `owner()`."""

    def __init__(self, cell_dir: str | Path) -> None:
        self.dir = Path(cell_dir)
        self.path = self.dir / LOCK_NAME
        self.owner_path = self.dir / OWNER_NAME
        self._lock: FileLock | None = None

    def acquire(self, timeout_s: float = 0.0) -> bool:
        """Take the lock, waiting up to `timeout_s` seconds; False when another process keeps it."""
        self.dir.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(self.path), thread_local=False, is_singleton=False)
        try:
            lock.acquire(timeout=max(0.0, timeout_s), poll_interval=0.2)
        except Timeout:
            return False
        self._lock = lock
        from mmflow.storage.store import atomic_write_json

        atomic_write_json(self.owner_path, this_process())
        return True

    def release(self) -> None:
        if self._lock is not None:
            self.owner_path.unlink(missing_ok=True)
            self._lock.release()
            self._lock = None

    def owner(self) -> dict[str, Any] | None:
        """The recorded holder (may be stale when the lock is free)."""
        try:
            return json.loads(self.owner_path.read_text())
        except (OSError, ValueError):
            return None


class Terminated(KeyboardInterrupt):
    """A KeyboardInterrupt raised for a signal (SIGTERM); `signum` gives the exit code 128 + signum."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"terminated by signal {signum}")
        self.signum = signum


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM (schedulers, `kill`) into KeyboardInterrupt, so the ending is recorded on disk."""

    def handler(signum: int, frame: Any) -> None:
        raise Terminated(signum)

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def exclusive_dir(base: str) -> str:
    """Create `base` (or `base_2`, `base_3`, ...) exclusively and return the one created.

    Two launches that name their folder by the same one-second timestamp get two folders.
    Registered as the OmegaConf resolver `mmflow.unique_dir` (see `register_resolvers`).
    """
    from mmflow.config.paths import expand_path
    from mmflow.errors import PathConfigError
    from mmflow.storage.objectstore import is_uri, mirror_dir

    results, sep, rest = str(base).partition("/_hydra/")
    try:  # `~/x`, `$HOME/x`: never a folder named `$HOME`; a store URI: its local mirror
        local = (
            str(mirror_dir(results.rstrip("/"))) if is_uri(results) else expand_path(results, "results_dir")
        )
        root = Path(local + sep + rest)
    except PathConfigError as exc:
        raise ConfigError(str(exc)) from None
    try:
        root.parent.mkdir(parents=True, exist_ok=True)
        for n in range(1, 10_000):
            candidate = root if n == 1 else root.with_name(f"{root.name}_{n}")
            try:
                candidate.mkdir()
            except FileExistsError:
                continue
            return str(candidate)
    except OSError as exc:
        raise ConfigError(folder_error(base, exc)) from None
    raise RuntimeError(f"cannot create a fresh folder next to {root}")


def folder_error(base: str, exc: OSError) -> str:
    """One line for a run folder that cannot be made, named by its `results_dir` where it has one."""
    results = base.split("/_hydra/")[0] if "/_hydra/" in base else base
    path = Path(results)
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        where = "" if existing == path else f": '{existing}'"
        return f"results_dir '{results}'{where} is a file, not a folder"
    reason = (exc.strerror or str(exc)).lower()
    return f"cannot write to results_dir '{results}': {reason}"


def register_resolvers() -> None:
    """Register `${mmflow.unique_dir:<path>}` (cached per config, so resolved once per launch)."""
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("mmflow.unique_dir"):
        OmegaConf.register_new_resolver("mmflow.unique_dir", exclusive_dir, use_cache=True)


def stale_running(record: dict[str, Any], owner_key: str = "owner") -> str | None:
    """Why a `running` record is stale (its writer is gone), or None when it may still run."""
    if record.get("status") != "running":
        return None
    owner = record.get(owner_key)
    alive = process_alive(owner)
    if alive is False:
        reused = process_started_at(int(owner["pid"])) is not None
        gone = "whose pid now belongs to another process" if reused else "which is no longer running"
        return f"left 'running' by {describe(owner)}, {gone}"
    return None


def mark_stale_sweeps(sweeps_root: Path, current: Path) -> list[Path]:
    """Report and mark `sweep.json` files under `sweeps_root` left `running` by a dead driver.

    Each becomes `status: "interrupted"` with `stale: <why>`; returns their paths.
    """
    from mmflow.storage.store import atomic_write_json

    marked = []
    for path in sorted(Path(sweeps_root).glob("*/sweep.json")):
        if path.parent.resolve() == Path(current).resolve():
            continue
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        why = stale_running(record, "driver")
        if why is None:
            continue
        log.warning("stale sweep record %s: %s; marking it interrupted", path, why)
        print(f"[mmflow] stale sweep record {path}: {why}; marked interrupted", flush=True)
        record.update(status="interrupted", stale=why, stale_detected=time.strftime("%Y-%m-%dT%H:%M:%S"))
        atomic_write_json(path, record)
        marked.append(path)
    return marked
