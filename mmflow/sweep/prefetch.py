"""Weights on every node: `mmflow prefetch [overrides]` and the per-node model preflight.

`mmflow prefetch` composes a sweep exactly as `mmflow run -m` does and puts each of its models where
every node can load it: a hub id is downloaded into the node's Hugging Face cache
(`huggingface_hub.snapshot_download`, one Ray task pinned to each alive node when the sweep joins a
cluster, in this process otherwise; a shared `HF_HOME` makes that one download); a local checkpoint
folder is checked for presence on each node; built-in `toy:`/`tiny:`/`replica:` models need nothing.
A sweep that joins a cluster runs the same presence check on every node before its cells start
(`node_preflight`): a node missing a model is one root cause, naming the node and the cells it blocks.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

log = logging.getLogger("mmflow.sweep")
BUILTIN = ("toy", "tiny", "replica")
CHECK_TIMEOUT_S = 120.0  # the preflight's presence checks on all nodes; a node silent longer is warned about
Model = tuple[str, str | None]  # (checkpoint, revision)


def sweep_models(cells: dict[str, dict[str, Any]]) -> dict[Model, list[str]]:
    """(checkpoint, revision) of each distinct model of `cells` -> the ids of the cells that use it."""
    models: dict[Model, list[str]] = {}
    for cell_id, cell in cells.items():
        model = cell.get("model") or {}
        checkpoint = str(model.get("checkpoint") or "")
        if checkpoint and checkpoint.split(":")[0] not in BUILTIN:
            revision = model.get("revision")
            models.setdefault((checkpoint, str(revision) if revision else None), []).append(cell_id)
    return models


def is_local(checkpoint: str) -> bool:
    return checkpoint.startswith(("/", ".", "~")) or Path(checkpoint).expanduser().is_dir()


def place_model(checkpoint: str, revision: str | None, download: bool) -> str | None:
    """On this node: None when `checkpoint` is loadable here (downloading a hub id when `download`),
    else why not."""
    if is_local(checkpoint):
        folder = Path(checkpoint).expanduser()
        if not folder.is_dir():
            return f"checkpoint folder {checkpoint} does not exist"
        if not (folder / "config.json").is_file():
            return f"checkpoint folder {checkpoint} has no config.json"
        return None
    from huggingface_hub import snapshot_download, try_to_load_from_cache

    try:
        if download:
            snapshot_download(checkpoint, revision=revision)
            return None
        if isinstance(try_to_load_from_cache(checkpoint, "config.json", revision=revision), str):
            return None
    except Exception as exc:  # noqa: BLE001 - the reason is the result
        return f"checkpoint {checkpoint} could not be downloaded: {type(exc).__name__}: {exc}"
    if os.environ.get("HF_HUB_OFFLINE") in ("1", "true", "True") or os.environ.get("TRANSFORMERS_OFFLINE"):
        return f"checkpoint {checkpoint} is not in the Hugging Face cache (run `mmflow prefetch`)"
    return None  # online: the actor downloads it


def place_models(models: list[Model], download: bool) -> dict[str, Any]:
    """This node's name and, per checkpoint, None or the reason it cannot be loaded here."""
    return {
        "node": socket.gethostname(),
        "problems": {
            checkpoint: place_model(checkpoint, revision, download) for checkpoint, revision in models
        },
    }


def on_every_node(models: list[Model], download: bool) -> dict[str, dict[str, Any]]:
    """`place_models` on each alive node of the Ray cluster this process is connected to, keyed by
    node id (one task per node, pinned there with `NodeAffinitySchedulingStrategy`)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    task = ray.remote(num_cpus=0, max_retries=0)(place_models)
    refs = {}
    for node in ray.nodes():
        if node.get("Alive"):
            strategy = NodeAffinitySchedulingStrategy(node_id=node["NodeID"], soft=False)
            refs[node["NodeID"]] = task.options(scheduling_strategy=strategy).remote(models, download)
    results = {}
    deadline = time.monotonic() + CHECK_TIMEOUT_S
    for node_id, ref in refs.items():
        try:  # a check answers at once; a download may take hours
            wait = None if download else max(deadline - time.monotonic(), 1.0)
            results[node_id] = ray.get(ref, timeout=wait)
        except Exception as exc:  # noqa: BLE001 - a node that died meanwhile: said, not raised
            results[node_id] = {"node": "?", "error": f"{type(exc).__name__}: {exc}"}
    return results


def root_causes(results: dict[str, dict[str, Any]], models: dict[Model, list[str]]) -> dict[str, list[str]]:
    """One root cause per (model problem) with the nodes that have it -> the ids of the cells it blocks."""
    by_problem: dict[tuple[str, str], list[str]] = {}
    for node_id, result in results.items():
        where = f"{result.get('node', '?')} ({node_id[:8]})"
        if "error" in result:
            by_problem.setdefault(("", f"node check failed: {result['error']}"), []).append(where)
            continue
        for checkpoint, problem in result["problems"].items():
            if problem:
                by_problem.setdefault((checkpoint, problem), []).append(where)
    causes: dict[str, list[str]] = {}
    for (checkpoint, problem), nodes in by_problem.items():
        cells = sorted({c for (ckpt, _), ids in models.items() if ckpt == checkpoint for c in ids})
        causes[f"{problem} on node{'s' * (len(nodes) > 1)} {', '.join(sorted(nodes))}"] = cells
    return causes


def node_preflight(cells: dict[str, dict[str, Any]]) -> dict[str, list[str]]:
    """Root cause -> blocked cell ids, checked on every node of the connected Ray cluster (nothing
    is downloaded: a hub id blocks only when it is not cached and the hub is off)."""
    models = sweep_models(cells)
    if not models:
        return {}
    causes = root_causes(on_every_node(list(models), download=False), models)
    for cause in [c for c, ids in causes.items() if not ids]:  # a node that could not be asked
        log.warning("preflight: %s", cause)
        del causes[cause]
    return causes


def prefetch(cells: dict[str, dict[str, Any]], ray_settings: Any | None) -> dict[str, list[str]]:
    """Download / check every model of `cells` on every node (Ray, when `ray_settings.init.address`
    is set) or here; prints one line per model and node, returns the root causes left."""
    models = sweep_models(cells)
    if not models:
        print("[mmflow] prefetch: the sweep uses only built-in models; nothing to fetch")
        return {}
    address = ((getattr(ray_settings, "init", None) or {}).get("address") or "") if ray_settings else ""
    if address:
        from mmflow.sweep.ray_session import ray_session

        with ray_session(ray_settings):
            results = on_every_node(list(models), download=True)
    else:
        results = {"local": place_models(list(models), download=True)}
    for node_id, result in results.items():
        for checkpoint, problem in (result.get("problems") or {}).items():
            state = f"missing: {problem}" if problem else "ready"
            print(f"[mmflow] prefetch: {result['node']} ({node_id[:8]}) {checkpoint}: {state}")
    causes = root_causes(results, models)
    for cause, cell_ids in causes.items():
        print(f"[mmflow] prefetch: {cause} (blocks {plural(cell_ids, 'cell')})")
    return causes


def plural(items: Iterable[Any], noun: str) -> str:
    n = len(list(items))
    return f"{n} {noun}{'s' * (n != 1)}"
