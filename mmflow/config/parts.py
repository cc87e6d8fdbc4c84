"""The parts of a cell spec (`mmflow.config.spec.CellSpec`): model, data, engine and analysis, each
its own frozen type, and `FrozenMap`, the read-only mapping their settings are kept in.

A leaf module (it imports nothing of mmflow's but the errors): the model loader
(`mmflow.models.registry`) takes a `ModelSpec` without importing the config checks.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields
from typing import Any

from mmflow.errors import CellConfigError


def freeze(value: Any) -> Any:
    """`value` with every mapping a `FrozenMap` and every list a tuple (nothing left to mutate)."""
    if isinstance(value, Mapping):
        return FrozenMap(value)
    if isinstance(value, list | tuple):
        return tuple(freeze(v) for v in value)
    return value


def thaw(value: Any) -> Any:
    """A fresh plain copy of a frozen value: dicts and lists, as a resolved config has them."""
    if isinstance(value, Mapping):
        return {k: thaw(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [thaw(v) for v in value]
    return value


class FrozenMap(Mapping):
    """A read-only mapping (nested values frozen too) that pickles, unlike `types.MappingProxyType`."""

    __slots__ = ("_data",)

    def __init__(self, data: Mapping[str, Any] = ()) -> None:  # type: ignore[assignment]
        self._data = {k: freeze(v) for k, v in dict(data).items()}

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return f"FrozenMap({self._data!r})"

    def __hash__(self) -> int:
        return hash(tuple(sorted((k, repr(v)) for k, v in self._data.items())))

    def __getstate__(self) -> dict[str, Any]:
        return self._data

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._data = state


@dataclass(frozen=True)
class ModelSpec:
    """`conf/model/<name>.yaml`: every key a shipped model defines is a field (plus `device_map` and
    `max_tokens`, `mmflow.config.known_keys.OPTIONAL_KEYS`). `family`, `size` and `resources` are labels
    and requests, not part of the cell id (`mmflow.config.identity.NON_SEMANTIC_MODEL_KEYS`)."""

    name: str
    checkpoint: str | None = None
    model_class: str | None = None
    dtype: str | None = None
    prompt_format: str | None = None
    image_preprocess: str | None = None
    n_layers: int | None = None
    default_window: int | None = None
    require_correct: bool | None = None
    trust_remote_code: bool = False
    revision: str | None = None
    device: str = "auto"
    parity: str | None = None  # only the models the paper ran carry it (`parity: ${parity}`)
    device_map: Any = None  # placement over GPUs (`mmflow.models.placement`)
    max_tokens: int | None = None  # a shorter context (each sample's sequence is capped)
    family: str | None = None
    size: str | None = None
    resources: FrozenMap | None = None

    @classmethod
    def from_mapping(cls, model: Mapping[str, Any]) -> ModelSpec:
        """The spec of a model config; `CellConfigError` naming a key no field has (a misspelt key)."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(model) - names)
        if unknown:
            raise CellConfigError(
                f"model.{unknown[0]}",
                model[unknown[0]],
                f"unknown model key; model keys: {', '.join(sorted(names))}",
            )
        if not isinstance(model.get("name"), str):
            raise CellConfigError("model.name", model.get("name"), "must be a string")
        return cls(**{k: freeze(v) for k, v in model.items()})

    def to_dict(self) -> dict[str, Any]:
        """The plain model config (only the keys that are set or have a non-default value)."""
        return {f.name: thaw(getattr(self, f.name)) for f in fields(self)}


@dataclass(frozen=True)
class DataSpec:
    """`conf/data/<name>.yaml`: the source's name and its own settings (read-only, `name` included)."""

    name: str
    settings: FrozenMap

    @property
    def source(self) -> Any:
        """The registered `mmflow.data.sources.DataSource` of `name` (ValueError if none)."""
        from mmflow.data.sources import data_source

        return data_source(self.name)


@dataclass(frozen=True)
class EngineSpec:
    """`conf/engine/<name>.yaml`: which engine (`mmflow.knockout.make_engine`) and the attention
    backend of the clean pass and the knockouts (sdpa | eager)."""

    name: str
    attention: str


@dataclass(frozen=True)
class AnalysisSpec:
    """`conf/analysis/<name>.yaml`: the analysis's name and its own top-level keys (read-only)."""

    name: str
    settings: FrozenMap
