"""Check one cell config before anything is loaded: a cell that cannot compute anything meaningful
is an error naming the key and the values it allows, and it fails alone (never its neighbours).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mmflow.data.sample import TASKS

ANALYSES = ("knockout", "answer_tracking", "patching")
CORRUPTIONS = ("noise", "counterfactual", "blank")
DATA_SOURCES = ("shapes", "gqa", "table")
ENGINES = ("fast", "reference")
ATTENTIONS = ("sdpa", "eager")
LENSES = ("norm", "raw")
# Token groups in prompt order (METHOD.md, "Token groups"): the image comes first, then the question,
# then the last position; object/nonobject lie inside the image, the options inside the question.
GROUP_RANK = {
    "image": 0,
    "object": 0,
    "nonobject": 0,
    "question": 1,
    "true_option": 1,
    "false_option": 1,
    "last": 2,
}


class CellConfigError(ValueError):
    """A cell config that cannot compute anything meaningful; the message names the key."""

    def __init__(self, key: str, value: Any, allowed: str) -> None:
        super().__init__(f"{key}={value!r}: {allowed}")
        self.key = key


def _int(config: Mapping[str, Any], key: str, low: int, high: int | None = None) -> int:
    value = config.get(key)
    allowed = f"an integer >= {low}" if high is None else f"an integer in {low}..{high}"
    if isinstance(value, bool) or not isinstance(value, int):
        raise CellConfigError(key, value, f"must be {allowed}")
    if value < low or (high is not None and value > high):
        raise CellConfigError(key, value, f"must be {allowed}")
    return value


def _choice(key: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise CellConfigError(key, value, f"unknown {key} {value!r}; must be one of {', '.join(allowed)}")


def validate_cell(config: Mapping[str, Any]) -> None:
    """Raise `CellConfigError` (naming the key and allowed values) unless `config` is computable.

    Checks: task, analysis, data source, engine, n_samples >= 1, max_new_tokens >= 1, the knockout's
    groups and window (1..model.n_layers), the lens, patching's corruption and seed.
    """
    _choice("task", config.get("task"), TASKS)
    analysis = config.get("analysis", "knockout")
    _choice("analysis", analysis, ANALYSES)
    data = config.get("data") or {}
    _choice("data.name", data.get("name"), DATA_SOURCES)
    engine = config.get("engine") or {}
    _choice("engine.name", engine.get("name"), ENGINES)
    _choice("engine.attention", engine.get("attention", "sdpa"), ATTENTIONS)
    _int(config, "n_samples", 1)
    _int(config, "max_new_tokens", 1)
    if analysis == "knockout":
        _check_knockout(config)
    if analysis == "patching":
        _choice("corruption", config.get("corruption", "noise"), CORRUPTIONS)
        if "seed" in config:
            _int(config, "seed", 0)
        n_layers = (config.get("model") or {}).get("n_layers")
        _int(config, "window", 1, int(n_layers) if n_layers else None)
    if analysis == "answer_tracking":
        _choice("lens", config.get("lens", "norm"), LENSES)


def _check_knockout(config: Mapping[str, Any]) -> None:
    knockout = config.get("knockout") or {}
    source, target = knockout.get("source"), knockout.get("target")
    groups = tuple(GROUP_RANK)
    _choice("knockout.source", source, groups)
    _choice("knockout.target", target, groups)
    if GROUP_RANK[source] > GROUP_RANK[target]:
        later = [g for g, r in GROUP_RANK.items() if r <= GROUP_RANK[target]]
        raise CellConfigError(
            "knockout.source",
            source,
            f"comes after target {target!r} in the prompt, so causal attention never lets {target} "
            f"attend to it and the knockout blocks nothing; for target {target!r} use a source in "
            f"{', '.join(later)}",
        )
    n_layers = (config.get("model") or {}).get("n_layers")
    _int(config, "window", 1, int(n_layers) if n_layers else None)
