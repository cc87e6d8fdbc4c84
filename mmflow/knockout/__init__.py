"""Knockout specs, the attention function that applies them, and the engines that run them."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mmflow.knockout.engines import engine_factory, engine_names, register_engine

if TYPE_CHECKING:
    from mmflow.models.registry import LoadedModel

__all__ = ["engine_names", "make_engine", "register_engine"]


def make_engine(name: str, loaded: LoadedModel, attention: str) -> Any:
    """The engine named by `engine.name` (`mmflow.knockout.engines`); it routes the language model's
    attention through mmflow's `attention` backend (`engine.attention`: sdpa | eager) before anything
    runs. ValueError for an engine no module registered."""
    return engine_factory(name)(loaded, attention)
