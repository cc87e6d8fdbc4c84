"""`results_dir` as an object-store URI (`s3://bucket/prefix`, `gs://…`, any fsspec filesystem).

The driver is the single writer. It keeps a local mirror of the URI (`mirror_dir`, under
`$MMFLOW_RESULTS_MIRROR`, default `~/.cache/mmflow/results-mirror/<scheme>/<bucket>/<prefix>`), so
locks, resume and the atomic local writes work as for a folder; each file it writes there is then
uploaded whole (`sync`: one PUT, which S3 commits atomically, after the local write-then-rename), and
a file it removes there is removed from the store. A sweep first reads each of its cells from the
store into the mirror (`pull`), so resume sees what the store holds, whichever machine wrote it.
Endpoints and credentials come from fsspec's usual settings (`AWS_*`, `FSSPEC_S3_ENDPOINT_URL`, …).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

log = logging.getLogger("mmflow.sweep")
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
LOCAL_ONLY = ".lock"  # `.lock`, `.lock.owner.json`: a driver's own lock files stay in its mirror


def is_uri(value: object) -> bool:
    """Whether `value` is a URI (`scheme://…`), not a local path."""
    return isinstance(value, str) and bool(_URI.match(value)) and not value.startswith("file://")


def mirror_base() -> Path:
    base = os.environ.get("MMFLOW_RESULTS_MIRROR") or "~/.cache/mmflow/results-mirror"
    return Path(base).expanduser().resolve()


def mirror_dir(uri: str) -> Path:
    """The local mirror folder of `uri` (`<base>/<scheme>/<bucket>/<prefix>`)."""
    scheme, _, rest = uri.partition("://")
    parts = [p for p in rest.split("/") if p]
    if not parts or any(p in (".", "..") for p in parts):
        raise ValueError(f"results_dir={uri!r}: a URI needs a bucket and no '.'/'..' parts")
    return mirror_base().joinpath(scheme, *parts)


def uri_of(path: Path) -> str | None:
    """The store URI a mirrored `path` stands for; None for a path outside every mirror."""
    try:
        relative = Path(os.path.abspath(path)).relative_to(mirror_base())
    except ValueError:
        return None
    if len(relative.parts) < 2:
        return None
    scheme, *rest = relative.parts
    return f"{scheme}://{'/'.join(rest)}"


def filesystem(uri: str) -> tuple[Any, str]:
    """The fsspec filesystem of `uri` and the path in it."""
    from fsspec.core import url_to_fs

    return url_to_fs(uri)


def sync(*paths: Path) -> None:
    """Upload each mirrored path that exists (one whole-object PUT), delete from the store each one
    that does not; paths outside a mirror and lock files are left alone."""
    for path in paths:
        uri = uri_of(path)
        if uri is None or Path(path).name.startswith(LOCAL_ONLY):
            continue
        fs, remote = filesystem(uri)
        try:
            if Path(path).is_file():
                fs.put_file(str(path), remote)  # a missing bucket raises FileNotFoundError here
            elif not Path(path).exists() and fs.exists(remote):
                fs.rm_file(remote)
        except Exception as exc:  # noqa: BLE001 - say which object, whatever the filesystem raised
            raise OSError(f"results store: writing {uri} failed: {type(exc).__name__}: {exc}") from exc


def pull(uri: str, cell_ids: Iterable[str]) -> int:
    """Make the mirror's folders of `cell_ids` hold what the store holds (files the store lacks are
    removed, lock files kept); the number of files read."""
    fs, root = filesystem(uri)
    bucket = root.split("/", 1)[0]
    if not fs.exists(bucket):
        raise FileNotFoundError(f"results_dir={uri}: bucket {bucket} does not exist (or is not visible)")
    local = mirror_dir(uri)
    wanted = set(cell_ids)
    remote_files: dict[str, list[str]] = {}
    try:
        found = fs.find(root)
    except FileNotFoundError:
        found = []
    for key in found:
        relative = key[len(root.rstrip("/")) + 1 :]
        if relative.split("/", 1)[0] in wanted:
            remote_files.setdefault(relative.split("/", 1)[0], []).append(relative)
    count = 0
    for cell_id in wanted:
        folder = local / cell_id
        if folder.is_dir():
            for item in folder.iterdir():
                if not item.name.startswith(LOCAL_ONLY):
                    shutil.rmtree(item) if item.is_dir() else item.unlink()
        for relative in remote_files.get(cell_id, []):
            target = local / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(f"{root.rstrip('/')}/{relative}", str(target))
            count += 1
    return count


def pull_cells(cells: dict[str, dict[str, Any]]) -> None:
    """`pull` the cells whose `results_uri` is a store, one listing per store."""
    by_uri: dict[str, list[str]] = {}
    for cell_id, cell in cells.items():
        if cell.get("results_uri"):
            by_uri.setdefault(str(cell["results_uri"]), []).append(cell_id)
    for uri, cell_ids in by_uri.items():
        count = pull(uri, cell_ids)
        log.info(
            "results store %s: %d file(s) of %d cell(s) read into %s",
            uri,
            count,
            len(cell_ids),
            mirror_dir(uri),
        )
