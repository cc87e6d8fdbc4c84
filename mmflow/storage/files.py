"""Atomic file writes: a temporary file in the same folder, fsync, then rename over the target.

A crash never leaves a half-written file under the target's name (used by the store, the sweep
record and the secrets redaction). Files and staging folders get the mode a plain `open()` /
`mkdir()` would give (umask applied), not tempfile's owner-only 0600 / 0700.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from mmflow.storage.objectstore import sync


def current_umask() -> int:
    """The process umask (read from /proc where it can be, so no thread ever sees it changed)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def make_temp_dir(parent: Path, prefix: str) -> Path:
    """A new staging folder in `parent` with a plain `mkdir`'s mode (0o777 & ~umask)."""
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    folder.chmod(0o777 & ~current_umask())
    return folder


def apply_umask(folder: Path) -> None:
    """Give everything under `folder` a plain `open()` / `mkdir()` mode (some writers, such as
    transformers' shard writer, leave files owner-only)."""
    mask = current_umask()
    for path in [Path(folder), *Path(folder).rglob("*")]:
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over `path`.

    The file keeps the mode of the one it replaces, else gets 0o666 & ~umask (as `open()` would).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = path.stat().st_mode & 0o7777
    except OSError:
        mode = 0o666 & ~current_umask()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    sync(path)  # a mirror of an object store (results_dir=s3://…): the whole file, one PUT


def json_bytes(payload: Mapping[str, Any]) -> bytes:
    """The bytes of a JSON file as every writer here writes it (indented, keys sorted)."""
    return json.dumps(payload, indent=2, sort_keys=True, default=str).encode()


def parquet_bytes(frame: pd.DataFrame, schema: Any = None) -> bytes:
    """The bytes of a parquet file of `frame` (no index), as every writer here writes it; with a
    `pyarrow.Schema`, exactly those columns and types (an empty frame too: `mmflow.storage.schema`)."""
    import io

    buffer = io.BytesIO()
    if schema is None:
        frame.to_parquet(buffer, index=False)
    else:
        import pyarrow.parquet as pq

        from mmflow.storage.schema import to_table

        pq.write_table(to_table(frame, schema), buffer)
    return buffer.getvalue()


def atomic_write_json(path: Path, payload: Mapping[str, Any]) -> None:
    atomic_write_bytes(path, json_bytes(payload))


def atomic_write_parquet(path: Path, frame: pd.DataFrame, schema: Any = None) -> None:
    """Write `frame` atomically (`parquet_bytes`)."""
    atomic_write_bytes(path, parquet_bytes(frame, schema))
