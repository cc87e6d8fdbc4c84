"""Check one cell config before anything is loaded: a cell that cannot compute anything meaningful
is an error naming the key and the values it allows, and it fails alone (never its neighbours).

The keys every cell has are checked here; the analysis checks its own (`Analysis.validate`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mmflow.analyses.base import DEFAULT_ANALYSIS, analysis_class, known_analyses
from mmflow.config.checks import check_bool, check_choice, check_int
from mmflow.data.sample import TASKS
from mmflow.errors import CellConfigError

__all__ = ["CellConfigError", "validate_cell"]

ATTENTIONS = ("sdpa", "eager")
DTYPES = ("float32", "float16", "bfloat16")  # the names `mmflow.models.registry.DTYPES` maps to torch


def data_sources() -> tuple[str, ...]:
    """The data source choices: shipped and registered (`mmflow.data.sources`)."""
    from mmflow.data.sources import known_sources

    return tuple(known_sources())


def engines() -> tuple[str, ...]:
    """The engine choices: registered (`mmflow.knockout.engines`)."""
    from mmflow.knockout.engines import engine_names

    return engine_names()


def validate_cell(config: Mapping[str, Any]) -> None:
    """Raise `CellConfigError` (naming the key and allowed values) unless `config` is computable.

    Checks: task, analysis, data source (and its own keys, `DataSource.validate`), engine and its
    attention, n_samples >= 1, max_new_tokens >= 1, require_correct a boolean, model.max_tokens (null
    or >= 2), then the analysis's own keys (e.g. the knockout's groups and window, the lens,
    patching's corruption).
    """
    check_choice("task", config.get("task"), TASKS)
    analysis = config.get("analysis", DEFAULT_ANALYSIS)
    try:
        kind = analysis_class(str(analysis))
    except ValueError:  # neither shipped nor registered
        check_choice("analysis", analysis, tuple(known_analyses()))
        raise
    data = config.get("data") or {}
    check_choice("data.name", data.get("name"), data_sources())
    engine = config.get("engine") or {}
    check_choice("engine.name", engine.get("name"), engines())
    check_choice("engine.attention", engine.get("attention"), ATTENTIONS)
    check_int(config, "n_samples", 1)
    check_int(config, "max_new_tokens", 1)
    check_bool(config, "require_correct")
    model = config.get("model") or {}
    if isinstance(model, Mapping) and model.get("dtype") is not None:  # `mmflow.models.registry.DTYPES`
        check_choice("model.dtype", model["dtype"], DTYPES)
    if isinstance(model, Mapping) and model.get("max_tokens") is not None:  # caps each sample's sequence
        check_int({"model.max_tokens": model["max_tokens"]}, "model.max_tokens", 2)
    from mmflow.data.sources import data_source

    data_source(str(data["name"])).validate(data)
    kind.validate(config)
