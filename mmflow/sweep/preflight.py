"""Preflight: what would fail every cell of a model or data source, checked once before any cell runs.

Per model: the checkpoint is reachable here (on every node when joining a cluster: mmflow.sweep.prefetch)
(a built-in `toy:`/`tiny:`/`replica:` model, a local folder,
the Hugging Face cache, or the hub when not offline), the packages its settings need are importable
(`accelerate` for `device_map`), the GPUs it asks for exist (on a local Ray with GPUs; without any,
models run on CPU). Per data source: the GQA image folder is set (else its cells are blocked) and
holds the first rows' images (else a warning: missing images are per-sample skips, as always).
Each blocking problem is one root cause; the cells it blocks fail with it at once (grouped in the
summary) and the other cells run. `--no-preflight` (hydra.launcher.preflight=false) skips it.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import logging
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mmflow.sweep.settings import SweepSettings

FIRST_ROWS = 3  # rows of a task file whose images must be there
WARNING = "warning: "  # a problem that does not block cells (missing images are per-sample skips)
log = logging.getLogger("mmflow.sweep")


def checkpoint_problem(model: dict[str, Any]) -> str | None:
    checkpoint = str(model.get("checkpoint") or "")
    if not checkpoint or checkpoint.split(":")[0] in ("toy", "tiny", "replica"):
        return None
    if Path(checkpoint).expanduser().is_dir():
        return None
    if checkpoint.startswith(("/", ".", "~")):
        return f"checkpoint folder {checkpoint} of {model.get('name')} does not exist"
    try:
        from huggingface_hub import try_to_load_from_cache

        if isinstance(try_to_load_from_cache(checkpoint, "config.json", revision=model.get("revision")), str):
            return None
    except Exception:  # noqa: BLE001 - an unusable cache reads as not cached
        pass
    if os.environ.get("HF_HUB_OFFLINE") in ("1", "true", "True") or os.environ.get("TRANSFORMERS_OFFLINE"):
        return f"checkpoint {checkpoint} is not in the Hugging Face cache and the hub is off (HF_HUB_OFFLINE)"
    return None  # online: transformers downloads it


def package_problem(model: dict[str, Any]) -> str | None:
    if model.get("device_map") and importlib.util.find_spec("accelerate") is None:
        return (
            f"No module named 'accelerate' (model {model.get('name')} sets device_map={model['device_map']})"
        )
    return None


def local_gpus() -> int:
    """GPUs on this machine (nvidia-smi), without importing torch."""
    if shutil.which("nvidia-smi") is None:
        return 0
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(line.startswith("GPU ") for line in out.stdout.splitlines())


def gpu_problem(model: dict[str, Any], settings: SweepSettings, gpus: Callable[[], int]) -> str | None:
    """Where this machine is the cluster (local Ray): more GPUs asked than it has. None GPUs at all
    runs the model on CPU (as `ray_executor.actor_options` does); a remote cluster's GPUs are Ray's."""
    if settings.executor != "ray" or (settings.ray.init or {}).get("address"):
        return None
    wanted = settings.models.get(str(model.get("name")), {}).get("gpus")
    wanted = float(wanted if wanted is not None else (model.get("resources") or {}).get("gpus") or 0)
    if wanted > 0 and 0 < gpus() < wanted:
        return f"model {model.get('name')} asks for {wanted:g} GPU(s); this machine has {gpus()}"
    return None


def table_problem(data: dict[str, Any], task: str) -> str | None:
    """`data=table`: its image folder exists and its file has the task's columns (after `data.columns`);
    a row's own faults stay per-sample skips."""
    from mmflow.data.table import read_frame, required

    image_dir = Path(str(data.get("image_dir") or "")).expanduser()
    if not data.get("image_dir") or not image_dir.is_dir():
        return f"table image folder not found: {data.get('image_dir')} (data.image_dir of {data.get('path')})"
    frame = read_frame(Path(str(data["path"])).expanduser(), data.get("format"))
    have = {str(c) for c in frame.rename(columns=dict(data.get("columns") or {})).columns}
    missing = [c for c in required(task) if c not in have]
    if missing:
        return (
            f"table {data.get('path')} lacks column(s) {', '.join(missing)} for task {task} (has: "
            f"{', '.join(sorted(have))}); map yours with data.columns"
        )
    return None


def data_problem(data: dict[str, Any], task: str) -> str | None:
    if data.get("name") == "table":
        return table_problem(data, task)
    if data.get("name") != "gqa":
        return None
    image_dir = data.get("image_dir")
    if not image_dir or not Path(str(image_dir)).expanduser().is_dir():
        return f"GQA image folder not set or missing ({image_dir}): set data.image_dir or GQA_IMAGE_DIR"
    from mmflow.data.gqa import GQA_TASKS_DIR

    folder = Path(str(image_dir)).expanduser()
    with (Path(data.get("tasks_dir") or GQA_TASKS_DIR) / f"{task}.csv").open(newline="") as handle:
        for i, row in enumerate(csv.DictReader(handle)):
            if i >= FIRST_ROWS:
                break
            image = folder / (row.get("image_file") or f"{row.get('img_id', '').strip()}.jpg")
            if not image.is_file():
                return (
                    f"{WARNING}GQA image folder {folder} lacks the first rows' images (no {image.name}): "
                    "their samples are skipped as missing_image"
                )
    return None


def preflight(
    cells: dict[str, dict[str, Any]], settings: SweepSettings, gpus: Callable[[], int] = local_gpus
) -> dict[str, list[str]]:
    """Root cause -> the ids of the cells it blocks; each check runs once per model or data source."""
    counted: dict[str, int] = {}

    def gpu_count() -> int:
        if "n" not in counted:
            counted["n"] = gpus()
        return counted["n"]

    # joining a cluster: the checkpoint is checked on every node (mmflow.sweep.prefetch.node_preflight)
    joins = settings.executor == "ray" and bool((settings.ray.init or {}).get("address"))
    checkpoint_check = (lambda m: None) if joins else checkpoint_problem
    seen: dict[str, str | None] = {}
    blocked: dict[str, list[str]] = {}
    warned: dict[str, list[str]] = {}
    for cell_id, cell in cells.items():
        model = cell.get("model") or {}
        checks = [
            ("model", model, lambda m=model: checkpoint_check(m) or package_problem(m)),
            ("gpu", model, lambda m=model: gpu_problem(m, settings, gpu_count)),
            (
                "data",
                [cell.get("data"), cell.get("task")],
                lambda c=cell: data_problem(c.get("data") or {}, c["task"]),
            ),
        ]
        for kind, subject, check in checks:
            key = kind + json.dumps(subject, sort_keys=True, default=str)
            if key not in seen:
                try:
                    seen[key] = check()
                except Exception as exc:  # noqa: BLE001 - a check that breaks is itself a cause
                    seen[key] = f"preflight {kind} check failed: {type(exc).__name__}: {exc}"
            problem = seen[key]
            if problem and problem.startswith(WARNING):
                warned.setdefault(problem.removeprefix(WARNING), []).append(cell_id)
            elif problem:
                blocked.setdefault(problem, []).append(cell_id)
                break
    for problem, cell_ids in warned.items():
        log.warning("preflight: %s (%d cell%s)", problem, len(cell_ids), "s" * (len(cell_ids) > 1))
    return blocked
