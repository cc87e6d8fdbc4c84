"""`model.trust_remote_code=true`: which of the checkpoint's own Python files run, said loudly.

A checkpoint's JSON configs (`config.json`, `processor_config.json`, `tokenizer_config.json`, ...) name
their code in `auto_map` (`"AutoProcessor": "processing_x.XProcessor"`); with trust_remote_code those
modules are imported by transformers (all but `AutoModel*` ones: mmflow names the model class
itself). `remote_code_files` lists them with their sha256 (null for a file named but absent), the
load prints them in one line and `cell.json` records them under `remote_code` (docs/faults.md).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def _references(value: Any) -> Iterator[str]:
    """Module references in an `auto_map` value: a string, or a list (e.g. tokenizer slow/fast)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _references(item)
    elif isinstance(value, dict):
        for key, item in value.items():
            if not str(key).startswith("AutoModel"):  # mmflow loads an explicit model class, never these
                yield from _references(item)


def _auto_maps(data: Any) -> Iterator[Any]:
    if isinstance(data, dict):
        for key, value in data.items():
            if key == "auto_map":
                yield value
            else:
                yield from _auto_maps(value)


def local_folder(path: str, revision: str | None = None) -> Path | None:
    """The folder the checkpoint was loaded from: `path` itself, or its snapshot in the hub cache."""
    if Path(path).is_dir():
        return Path(path)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(path, revision=revision, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached (or not a hub id): nothing to list
        return None


def remote_code_files(folder: Path) -> list[dict[str, str]]:
    """Every Python file the folder's `auto_map` entries name: `{"file", "sha256", "named_by"}`.

    A reference to another repository (`other/repo--module.Class`) is listed with `sha256: null`.
    """
    found: dict[str, dict[str, Any]] = {}
    for config in sorted(folder.glob("*.json")):
        try:
            data = json.loads(config.read_text())
        except (OSError, ValueError):
            continue
        for auto_map in _auto_maps(data):
            for ref in _references(auto_map):
                repo, _, module = ref.rpartition("--")
                name = module.rsplit(".", 1)[0].replace(".", "/") + ".py"
                file = f"{repo}:{name}" if repo else name
                entry = found.setdefault(file, {"file": file, "sha256": None, "named_by": []})
                if config.name not in entry["named_by"]:
                    entry["named_by"].append(config.name)
                if not repo and (folder / name).is_file():
                    entry["sha256"] = hashlib.sha256((folder / name).read_bytes()).hexdigest()
    return [found[k] for k in sorted(found)]


def report_remote_code(name: str, path: str, revision: str | None) -> dict[str, Any]:
    """Print which of the checkpoint's Python files run under trust_remote_code; what cell.json records."""
    folder = local_folder(path, revision)
    files = remote_code_files(folder) if folder is not None else []
    record = {"trust_remote_code": True, "checkpoint": path, "revision": revision, "files": files}
    if folder is None:
        line = f"cannot list its files ({path!r} is neither a folder nor in the hub cache)"
    elif not files:
        line = "its configs name no Python file (no auto_map): no checkpoint code runs"
    else:
        line = "this runs the checkpoint's own Python: " + ", ".join(
            f"{f['file']} (sha256 {str(f['sha256'])[:12]})" for f in files
        )
    message = f"[mmflow] WARNING model {name}: trust_remote_code=true; {line}"
    print(message, flush=True)
    log.warning("%s", message.removeprefix("[mmflow] "))
    return record
