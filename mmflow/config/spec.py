"""A cell as a frozen, typed spec: built once where its config is resolved, validated once, with its id.

`CellSpec.from_config(config)` canonicalises the config (`mmflow.config.identity.canonical`), resolves
its data (`DataSource.resolve`: a table's absolute paths and digest), computes the cell id and, unless
`check=False`, validates it (`mmflow.config.validate.validate_cell`: types, ranges, choices, the
analysis's and the data source's own checks). Everything downstream reads the spec: `spec.model`,
`spec.engine.attention`, `spec.id`; `spec.config` is the resolved plain config (what `cell.json`
records and what analyses read). Specs pickle (Ray actors get them).

Defaults live in the YAML files (`conf/`), not here: a field without a default is one every shipped
config sets. A model key no field names is an error, never a silent None (`ModelSpec.from_mapping`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmflow.config.parts import (  # noqa: F401 (the parts, importable with the spec)
    AnalysisSpec,
    DataSpec,
    EngineSpec,
    FrozenMap,
    ModelSpec,
    freeze,
    thaw,
)

# Top-level keys of a cell that are its own fields; every other key belongs to its analysis.
CELL_KEYS = frozenset(
    {"model", "data", "engine", "analysis", "task", "n_samples", "seed", "require_correct"}
    | {"max_new_tokens", "parity", "results_dir", "results_uri", "sweep_name", "logger"}
)


@dataclass(frozen=True)
class CellSpec:
    """One resolved cell: its four parts, the keys every cell has, its id and its plain config."""

    model: ModelSpec
    data: DataSpec
    engine: EngineSpec
    analysis: AnalysisSpec
    task: str
    n_samples: int
    seed: int | None  # patching's noise seed; None where the analysis reads none (ids imply 0)
    require_correct: bool
    max_new_tokens: int
    parity: str | None
    results_dir: str
    results_uri: str | None
    sweep_name: str | None
    id: str
    plain: FrozenMap = field(repr=False)
    checked: bool = field(default=False, compare=False)

    @property
    def config(self) -> dict[str, Any]:
        """The resolved cell config as plain data (a fresh copy: what `cell.json` records)."""
        return thaw(self.plain)

    @classmethod
    def from_config(
        cls, config: Mapping[str, Any], *, base: str | Path | None = None, check: bool = True
    ) -> CellSpec:
        """The spec of a resolved cell config: canonical, its data resolved (relative paths against
        `base`), its id computed, validated unless `check=False` (then call `check()` before running).

        Raises `CellConfigError` (an invalid cell, or a misspelt model key), `DataError` (a table file
        that is not there) or ValueError (an unknown analysis)."""
        if isinstance(config, CellSpec):
            return config.check() if check and not config.checked else config
        from mmflow.config.identity import canonical, cell_id
        from mmflow.data.sources import data_source

        plain = canonical(config)
        data = plain.get("data")
        if isinstance(data, Mapping):
            try:
                source = data_source(str(data.get("name")))
            except ValueError:  # `check` names the known sources
                source = None
            if source is not None:
                plain["data"] = source.resolve(data, base)
        spec = cls._build(plain, cell_id(plain))
        return spec.check() if check else spec

    @classmethod
    def _build(cls, plain: dict[str, Any], ident: str) -> CellSpec:
        from mmflow.analyses.base import DEFAULT_ANALYSIS

        model, data, engine = (plain.get(k) or {} for k in ("model", "data", "engine"))
        analysis = str(plain.get("analysis", DEFAULT_ANALYSIS))
        return cls(
            model=ModelSpec.from_mapping(model),
            data=DataSpec(str(data.get("name")), FrozenMap(data)),
            engine=EngineSpec(engine.get("name"), engine.get("attention")),
            analysis=AnalysisSpec(
                analysis, FrozenMap({k: v for k, v in plain.items() if k not in CELL_KEYS})
            ),
            task=plain.get("task"),  # type: ignore[arg-type]
            n_samples=plain.get("n_samples"),  # type: ignore[arg-type]
            seed=plain.get("seed"),
            require_correct=plain.get("require_correct"),  # type: ignore[arg-type]
            max_new_tokens=plain.get("max_new_tokens"),  # type: ignore[arg-type]
            parity=plain.get("parity"),
            results_dir=str(plain.get("results_dir")),
            results_uri=plain.get("results_uri"),
            sweep_name=plain.get("sweep_name"),
            id=ident,
            plain=FrozenMap(plain),
        )

    def check(self) -> CellSpec:
        """Validate once (`validate_cell`); the same spec marked checked. `CellConfigError` naming
        the key when the cell cannot compute anything meaningful."""
        if self.checked:
            return self
        from mmflow.config.validate import validate_cell

        validate_cell(self.config)
        object.__setattr__(self, "checked", True)
        return self
