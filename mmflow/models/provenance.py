"""What a cell really ran on: the loaded model's depth, and whether its weights are a replica's or random.

A model config names the real checkpoint's depth (`model.n_layers: 32` for llava-1.5-7b), but a shrunk
replica of it has 2 layers, and replicas and the tiny models have random weights. Labels, axes and
checks use the loaded depth, and outputs mark replicas and random weights, from the record made here
(`model_info`, written to `cell.json` as `model_info`). Imports nothing heavy: the report reads it too.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def weights_info(checkpoint: str, path: str, configured_n_layers: Any) -> dict[str, Any]:
    """Where the weights come from: `weights` (`random` or `trained`), `replica_of` (the hub id a
    replica copies, else None), `full_size` (replicas), `configured_n_layers` (the config's depth).

    Replicas carry `replica.json` (`mmflow.models.synthetic.replica`); `tiny:` checkpoints are the project's
    random-weight tiny models.
    """
    marker = Path(path) / "replica.json"
    replica: dict[str, Any] = {}
    if marker.is_file():
        try:
            replica = json.loads(marker.read_text())
        except (OSError, ValueError):
            replica = {"replicates": "?"}
    random = bool(replica) or str(checkpoint).startswith("tiny:")
    return {
        "weights": "random" if random else "trained",
        "replica_of": replica.get("replicates") if replica else None,
        "full_size": bool(replica.get("full_size", False)) if replica else None,
        "configured_n_layers": int(configured_n_layers) if configured_n_layers else None,
    }


def is_shrunk(info: Mapping[str, Any] | None) -> bool:
    """A replica smaller than the checkpoint it copies."""
    return bool(info and info.get("replica_of") and not info.get("full_size"))


def weights_note(info: Mapping[str, Any] | None) -> str:
    """How legends and titles mark the weights: "" for trained weights (or cells from before the
    record), else e.g. "shrunk replica, 2 of 32 layers, random weights"."""
    if not info or info.get("weights") != "random":
        return ""
    if not info.get("replica_of"):
        return "random weights"
    if info.get("full_size"):
        return "full-size replica, random weights"
    depth, configured = info.get("n_layers"), info.get("configured_n_layers")
    layers = f", {depth} of {configured} layers" if depth and configured and depth != configured else ""
    return f"shrunk replica{layers}, random weights"
