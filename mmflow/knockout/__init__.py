"""Knockout specs, the attention function that applies them, and the engines that run them."""

from __future__ import annotations

from mmflow.models.registry import LoadedModel


def make_engine(name: str, loaded: LoadedModel, attention: str = "sdpa"):
    """The engine named by `engine.name` in the config; it routes the language model's attention
    through mmflow's `attention` backend (`engine.attention`: sdpa | eager) before anything runs."""
    if name == "reference":
        from mmflow.knockout.reference import ReferenceEngine

        return ReferenceEngine(loaded, attention)
    if name == "fast":
        from mmflow.knockout.fast import make_fast_engine

        return make_fast_engine(loaded, attention)
    raise ValueError(f"unknown engine {name!r}; known: reference, fast")
