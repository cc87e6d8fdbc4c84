"""The registry of data sources: a data source is one module `mmflow/data/<name>.py` with a `DataSource`
subclass decorated by `@register_source`, and one config `conf/data/<name>.yaml` (`name: <name>` plus
its own keys). `data_source(name)` imports the module by its name, as `mmflow.analyses` does.

A source says how its samples are read (`load`), which of its keys are valid (`validate`), what its
config becomes when a cell is resolved (`resolve`, e.g. a table's digest) and how the cell id sees it
(`identity`, applied by `mmflow.config.identity`).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from mmflow.data.sample import Sample, Skip

_SOURCES: dict[str, type[DataSource]] = {}


class DataSource:
    """One kind of data (`data.name`). Classmethods only: a source holds no state."""

    name: ClassVar[str]

    @classmethod
    def load(cls, data: Mapping[str, Any], task: str, n_samples: int) -> list[Sample | Skip]:
        """The first `n_samples` samples of `task` from the data config `data`, in order."""
        raise NotImplementedError

    @classmethod
    def validate(cls, data: Mapping[str, Any]) -> None:
        """Raise `CellConfigError` (naming the key) unless `data` can be read. Default: nothing."""
        return None

    @classmethod
    def resolve(cls, data: Mapping[str, Any], base: str | Path | None = None) -> dict[str, Any]:
        """`data` as a cell records it (paths made absolute against `base`, digests). Default: as is."""
        return dict(data)

    @classmethod
    def identity(cls, data: Mapping[str, Any]) -> dict[str, Any]:
        """`data` as the cell id sees it. Default: as is (the ids of earlier cells included every key)."""
        return dict(data)

    @classmethod
    def check_identifiable(cls, data: Mapping[str, Any]) -> None:
        """ValueError when `data` lacks what its id needs (e.g. a table's digest). Default: nothing."""
        return None


def register_source(cls: type[DataSource]) -> type[DataSource]:
    """Class decorator: make `cls` the data source named `cls.name`."""
    if cls.name in _SOURCES and _SOURCES[cls.name] is not cls:
        raise ValueError(f"data source {cls.name!r} is registered twice")
    _SOURCES[cls.name] = cls
    return cls


def _shipped() -> set[str]:
    """Sources mmflow ships: a `conf/data/<name>.yaml` with a module `mmflow/data/<name>.py`."""
    from mmflow.config.dirs import CONF_DIR

    here = Path(__file__).parent
    return {p.stem for p in (CONF_DIR / "data").glob("*.yaml") if (here / f"{p.stem}.py").is_file()}


def known_sources() -> list[str]:
    """Names of the shipped and registered data sources."""
    return sorted(_shipped() | set(_SOURCES))


def data_source(name: str) -> type[DataSource]:
    """The data source named `name` (importing `mmflow.data.<name>`); ValueError if none."""
    if name not in _SOURCES and name in _shipped():
        importlib.import_module(f"mmflow.data.{name}")
    if name not in _SOURCES:
        raise ValueError(f"unknown data source {name!r}; known: {', '.join(known_sources())}")
    return _SOURCES[name]


def load_data(data: Mapping[str, Any], task: str, n_samples: int) -> list[Sample | Skip]:
    """The samples of a cell's data config (`data.name` picks the source), first `n_samples` in order."""
    return data_source(str(data["name"])).load(data, task, n_samples)
