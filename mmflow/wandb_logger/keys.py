"""Metric keys that the built dashboards name, and the inputs a cell's results come from.

A workspace in W&B has one run set for all its panels, so a panel cannot filter runs: a panel that
shows one knockout type of one task draws the keys only those cells log. Every cell therefore logs
its per-layer means a second time under a *facet key* that names task, variant, model and window:

    flow/<task>/<variant>/<model>[/w<window>][/heads=<h>]/<value>   against `rel_depth`
    heads/<task>/<variant>/<model>/w<window>/heads=each             the (layer, head) table

Model names are made key-safe (`.` -> `_`: W&B reads a dot as nesting). Nothing here imports wandb.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from typing import Any

from mmflow.analyses import analysis_for

FACET = "flow"
HEADS = "heads"
STYLES = ("solid", "dashed", "dotted", "dotdash", "dotdotdash")
PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")


def safe(part: Any) -> str:
    """A key-safe name: anything but letters, digits, `_`, `-` and `=` becomes `_`."""
    return re.sub(r"[^A-Za-z0-9_=-]", "_", str(part))


def facet_prefix(config: Mapping[str, Any]) -> str:
    """`flow/<task>/<variant>/<model>[/w<window>]` of a cell config."""
    labels = analysis_for(config).labels
    parts = [FACET, config["task"], labels.variant, config["model"]["name"]]
    if labels.window is not None:
        parts.append(f"w{labels.window}")
    if labels.heads is not None:  # per-head cells beside the all-heads cell of the same knockout and window
        parts.append(f"heads={labels.heads}")
    return "/".join(safe(p) for p in parts)


def facet_key(config: Mapping[str, Any], value: str) -> str:
    """The facet key of curve `value` (e.g. `rel_change_pct`, `recovered_pct/image`) of a cell."""
    return f"{facet_prefix(config)}/{value}"


def heads_key(config: Mapping[str, Any]) -> str:
    """The key of the per-head table of a `knockout.heads=each` cell."""
    return HEADS + facet_prefix(config).removeprefix(FACET)


def family(config: Mapping[str, Any]) -> str:
    model = config["model"]
    return str(model.get("family") or model["name"])


def size(config: Mapping[str, Any]) -> str:
    return str(config["model"].get("size") or "?")


def colours(configs: list[Mapping[str, Any]]) -> dict[str, str]:
    """A colour per model family (in sorted order of the families)."""
    families = sorted({family(c) for c in configs})
    return {f: PALETTE[i % len(PALETTE)] for i, f in enumerate(families)}


def styles(configs: list[Mapping[str, Any]]) -> dict[str, str]:
    """A line style per model size (in sorted order of the sizes)."""
    sizes = sorted({size(c) for c in configs})
    return {s: STYLES[i % len(STYLES)] for i, s in enumerate(sizes)}


# ---------------------------------------------------------------- lineage: what a cell was computed from


def _digest(payload: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def data_input(config: Mapping[str, Any]) -> dict[str, Any]:
    """The data a cell read: `data.sha256` (the file's digest) for a table, else the source's config.

    `artifact` is the W&B artifact name of the input (the same name for the same data).
    """
    data = dict(config.get("data") or {})
    data.pop("cache_dir", None)  # where the generated set is cached changes nothing in it
    if data.get("sha256"):
        digest, kind = str(data["sha256"]), "file"
    else:
        digest, kind = _digest(data), "config"
    return {
        "artifact": f"data-{safe(data.get('name', 'data'))}-{digest[:16]}",
        "digest": digest,
        "digest_of": kind,
        "data": data,
    }


def model_input(config: Mapping[str, Any]) -> dict[str, Any]:
    """The model a cell ran: checkpoint id and revision (`tiny:`/`toy:`/`replica:` are built locally)."""
    model = config["model"]
    checkpoint, revision = str(model.get("checkpoint") or model["name"]), model.get("revision")
    name = "model-" + safe(checkpoint.replace("/", "--").replace(":", "-"))
    return {
        "artifact": name + (f"-{safe(revision)}" if revision else ""),
        "checkpoint": checkpoint,
        "revision": revision,
        "replica": checkpoint.split(":", 1)[0] in ("tiny", "toy", "replica"),
        "name": model["name"],
        "family": model.get("family"),
        "dtype": model.get("dtype"),
    }
