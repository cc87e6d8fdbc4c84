"""Knockout specs, the attention function that applies them, and the engines that run them."""

from __future__ import annotations

from mmflow.models.registry import LoadedModel


def make_engine(name: str, loaded: LoadedModel):
    """The engine named by `engine.name` in the config."""
    if name == "reference":
        from mmflow.knockout.reference import ReferenceEngine

        return ReferenceEngine(loaded)
    if name == "fast":
        from mmflow.knockout.fast import make_fast_engine

        return make_fast_engine(loaded)
    raise ValueError(f"unknown engine {name!r}; known: reference, fast")
