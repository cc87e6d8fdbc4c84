"""The registry of engines (`engine.name`): an engine is a factory `(loaded, attention) -> engine`
registered with `@register_engine(name)`; `mmflow.knockout.make_engine` builds the one a cell names.

Nothing here imports torch or transformers: the config checks read `engine_names()`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mmflow.models.registry import LoadedModel

EngineFactory = Callable[["LoadedModel", str], Any]
_ENGINES: dict[str, EngineFactory] = {}


def register_engine(name: str) -> Callable[[EngineFactory], EngineFactory]:
    """Decorator: make the factory the engine named `name` (ValueError if another has the name)."""

    def add(factory: EngineFactory) -> EngineFactory:
        if name in _ENGINES and _ENGINES[name] is not factory:
            raise ValueError(f"engine {name!r} is registered twice")
        _ENGINES[name] = factory
        return factory

    return add


@register_engine("fast")
def _fast(loaded: LoadedModel, attention: str) -> Any:
    """The suffix-only recompute, or the reference engine named as its fallback."""
    from mmflow.knockout.fast import make_fast_engine

    return make_fast_engine(loaded, attention)


@register_engine("reference")
def _reference(loaded: LoadedModel, attention: str) -> Any:
    """The paper's algorithm: one full forward per knockout job."""
    from mmflow.knockout.reference import ReferenceEngine

    return ReferenceEngine(loaded, attention)


def engine_names() -> tuple[str, ...]:
    """The registered engine names, in registration order."""
    return tuple(_ENGINES)


def engine_factory(name: str) -> EngineFactory:
    """The factory of engine `name`; ValueError naming the known engines."""
    if name not in _ENGINES:
        raise ValueError(f"unknown engine {name!r}; known: {', '.join(_ENGINES)}")
    return _ENGINES[name]
