"""The checks a cell config is validated with: `CellConfigError` names the key and what it allows.

Shared by `mmflow.config.validate` (the keys every cell has) and each analysis's `validate` (its own keys).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mmflow.errors import CellConfigError


def check_int(config: Mapping[str, Any], key: str, low: int, high: int | None = None) -> int:
    """`config[key]`, which must be an integer in low..high (no upper bound when `high` is None)."""
    value = config.get(key)
    allowed = f"an integer >= {low}" if high is None else f"an integer in {low}..{high}"
    if isinstance(value, bool) or not isinstance(value, int):
        raise CellConfigError(key, value, f"must be {allowed}")
    if value < low or (high is not None and value > high):
        raise CellConfigError(key, value, f"must be {allowed}")
    return value


def window_for_depth(config: Mapping[str, Any], n_layers: int, weights: Mapping[str, Any] | None) -> int:
    """The window a cell runs with on the model as loaded, `n_layers` deep: its `window`, which must be
    in 1..n_layers (the config's `model.n_layers` may name another depth: a shrunk replica's is its own).

    The one exception is a shrunk replica at its model's `default_window` (chosen for the real depth):
    it runs with the whole loaded depth as its window, and rows, labels and `cell.json` say so.
    """
    from mmflow.models.provenance import is_shrunk

    width = config.get("window")
    default = (config.get("model") or {}).get("default_window")
    if isinstance(width, int) and width > n_layers and is_shrunk(weights) and width == default:
        return n_layers
    if isinstance(width, int) and width > n_layers:
        what = "the loaded model"
        if is_shrunk(weights):
            what = f"the loaded model (a shrunk replica of {weights['replica_of']})"  # type: ignore[index]
        raise CellConfigError(
            "window", width, f"{what} has {n_layers} decoder layers, so the window must be in 1..{n_layers}"
        )
    return check_int(config, "window", 1, n_layers)


def check_bool(config: Mapping[str, Any], key: str) -> bool:
    """`config[key]`, which must be true or false."""
    value = config.get(key)
    if not isinstance(value, bool):
        raise CellConfigError(key, value, "must be true or false")
    return value


def check_choice(key: str, value: Any, allowed: tuple[str, ...]) -> None:
    """`value` (of `key`) must be one of `allowed`."""
    if value not in allowed:
        raise CellConfigError(key, value, f"unknown {key} {value!r}; must be one of {', '.join(allowed)}")


def check_window(config: Mapping[str, Any]) -> int:
    """`window`: an integer in 1..model.n_layers (no upper bound when the model does not say)."""
    n_layers = (config.get("model") or {}).get("n_layers")
    return check_int(config, "window", 1, int(n_layers) if n_layers else None)
