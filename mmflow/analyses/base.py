"""The analysis protocol and the registry of analyses.

An analysis is one kind of cell (`conf/analysis/<name>.yaml` sets `analysis: <name>` and only the
keys that analysis reads). Everything that depends on the kind goes through this protocol: per
sample the runtime asks it for a `SamplePlan` (its knockout jobs, where the clean pass must keep
layer inputs from, and its own per-sample state), runs the clean pass once and every cell's knockout
jobs of that sample in one engine batch, then hands the plan back with the cell's slice of the
knockout log-probs and the engine capabilities it declared (`uses`) to `rows`. The store asks it for
the result schema; the W&B logger and the report ask it for the headline, the per-layer curve table,
the figures and the labels. Nothing outside `mmflow/analyses/` tests a kind string.

Adding an analysis: one module with a subclass of `Analysis` decorated by `@register`, one line in
`ANALYSES` (name -> module, imported only when a cell of that analysis is read or run), and one config
`conf/analysis/<name>.yaml` (`# @package _global_`, `analysis: <name>` plus the analysis's own keys).
A plug-in outside mmflow registers its class by importing its module (`@register`) instead.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import pandas as pd

if TYPE_CHECKING:  # annotations only: the analyses never import the runtime, report or logger
    import torch
    from matplotlib.figure import Figure

    from mmflow.data.sample import Sample, Skip
    from mmflow.execution.engines import Engines
    from mmflow.inputs.groups import TokenGroups
    from mmflow.knockout.clean_pass import CleanPass
    from mmflow.knockout.spec import KnockoutJob
    from mmflow.models.registry import LoadedModel

DEFAULT_ANALYSIS = "knockout"  # cells written before `analysis` was a config key are knockout cells
# The engine capabilities an analysis may ask the runtime for (`Analysis.uses`, `mmflow.execution.engines`):
# knockout jobs (run in the sample's batch, or from `rows`), restore jobs on a corrupted run (the
# patcher), gradients of the answer's log-probability. The clean pass is always there.
CAPABILITIES = frozenset({"knockouts", "restores", "gradients"})


@dataclass(frozen=True)
class SamplePlan:
    """What one cell needs of one sample (`Analysis.plan`), handed back to `Analysis.rows`.

    `knockouts`: jobs the runtime runs on the sample's clean pass, batched with every other cell's;
    `keep_from`: the first position whose layer inputs the clean pass must keep for the analysis's own
    engine calls in `rows` (None: none); `state`: the analysis's per-sample data (token ids, resolved
    positions, edges), so that nothing per sample is kept on the analysis between calls.
    """

    knockouts: list[KnockoutJob] = field(default_factory=list)
    keep_from: int | None = None
    state: Any = None

    @property
    def first_target(self) -> int | None:
        """The first position the clean pass must keep layer inputs from: the knockouts' first
        targets and `keep_from` (None when neither)."""
        firsts = [job.edges.first_target for job in self.knockouts]
        if self.keep_from is not None:
            firsts.append(self.keep_from)
        return min(firsts, default=None)


@dataclass(frozen=True)
class Labels:
    """How a cell is named in tables, legends and W&B.

    `variant`: what tells cells of one analysis apart for the same model and task (the knockout's
    config name; the analysis name when there is nothing else); `legend`: the paper's legend text
    ("Image ↛ Question"); `tags`: W&B tags, joined by "/" for the run name; `order`: sort key among
    cells of the same model and task; `window`: the knockout window width, None when there is none.
    """

    variant: str
    legend: str
    tags: tuple[str, ...]
    order: tuple = ()
    window: int | None = None
    heads: str | None = None  # head-resolved cells: "each", or the chosen heads joined by "_"


@dataclass
class FigureSpec:
    """A figure an analysis contributes to the report: its file stem, its caption, and the figure or
    how to draw it (a callable, drawn only when the report has no copy for the same `cells`).

    `cells`: the cells it draws (`CellData`); the report keys its cached files by their content.
    """

    stem: str
    caption: str
    draw: Figure | Callable[[], Figure]
    cells: Sequence[Any] = ()

    @property
    def figure(self) -> Figure:
        if callable(self.draw):  # a Figure is not callable
            self.draw = self.draw()
        return self.draw


class Analysis(ABC):
    """One kind of analysis, built from a resolved cell config (`config`).

    Compute side (needs `bind(loaded)` first): `plan` then `rows` per sample (either may raise
    `mmflow.errors.SampleSkip`: a per-sample skip, `GroupError` when a token group is missing),
    `prepare(samples)` once before the first sample, `record()` for `cell.json`; `uses` names the
    engine capabilities (`CAPABILITIES`) the runtime must provide. Config side: `validate(config)`
    before anything loads, `canonical` for the cell id. Output side (config and results only, so the
    report can use it on cell folders): `headline`, `curve_table`, `labels`, `figure`,
    `report_sections`, `comparison_key`, `plot_comparison`.
    """

    name: ClassVar[str]
    config_keys: ClassVar[tuple[str, ...]] = ()  # top-level keys this analysis reads (its YAML sets them)
    result_columns: ClassVar[list[str]]
    result_types: ClassVar[dict[str, str]]  # column -> type name (`mmflow.storage.schema`), for every column
    sort_by: ClassVar[list[str]] = ["question_id", "layer"]
    value_columns: ClassVar[tuple[str, ...]] = ()  # result columns the per-layer curve is made of
    minimum_of: ClassVar[str | None] = None  # the curve value whose minimum is the headline, if any
    # What its curves are, for dashboards that group analyses (mmflow.wandb_logger.specs): "effect"
    # (change of p(answer) under an intervention), "recovery" (restored share), "lens" (per-layer readout),
    # "screen" (estimates that are not curves).
    curve_role: ClassVar[str] = "effect"
    uses: ClassVar[frozenset[str]] = frozenset()  # engine capabilities it asks for (CAPABILITIES)

    def __init__(self, config: Mapping[str, Any]) -> None:
        missing = [k for k in self.config_keys if k not in config]
        if missing:
            raise ValueError(
                f"analysis {self.name!r} needs config keys {missing} (conf/analysis/{self.name}.yaml)"
            )
        self.config = dict(config)
        self.loaded: LoadedModel | None = None

    # ------------------------------------------------------------ compute side

    def bind(self, loaded: LoadedModel) -> Analysis:
        """Attach the loaded model the cell runs on; returns self."""
        self.loaded = loaded
        return self

    def prepare(self, samples: Sequence[Sample | Skip]) -> None:
        """Called once with the cell's samples before the first one is planned (default: nothing)."""
        return None

    @abstractmethod
    def plan(self, groups: TokenGroups, sample: Sample) -> SamplePlan:
        """What this cell needs of the sample's clean pass: knockout jobs (possibly none), where the
        clean pass must keep layer inputs from, and the per-sample state `rows` gets back.

        Raises `SampleSkip` (`GroupError` for a missing token group) to skip the sample for this cell.
        """

    @abstractmethod
    def rows(
        self,
        sample: Sample,
        clean: CleanPass,
        token_id: int,
        plan: SamplePlan,
        outputs: torch.Tensor,
        engines: Engines,
    ) -> list[dict]:
        """Result rows of one sample from its clean pass, its `plan`, and the last-position
        log-probs `outputs` [J, V] of the plan's knockouts (J = len(plan.knockouts), V = vocabulary;
        float32). `engines` gives the capabilities in `uses` (more knockouts, restores, gradients).
        Raises `SampleSkip` to skip the sample for this cell."""

    def record(self) -> dict[str, Any]:
        """What `cell.json` keeps of this analysis's run besides the results (default: nothing)."""
        return {}

    # ------------------------------------------------------------ output side

    @property
    def result_schema(self) -> Any:
        """The `pyarrow.Schema` of this cell's `results.parquet`, empty or not."""
        from mmflow.storage.schema import arrow_schema

        types = getattr(self, "result_types", None)
        if types is None:
            raise TypeError(
                f"analysis {self.name!r} declares no result_types (column -> type, mmflow.storage.schema)"
            )
        return arrow_schema(self.result_columns, types)

    @property
    def row_labels(self) -> dict[str, Any]:
        """Constant columns of every result row (model, task, ...)."""
        return {"model": self.config["model"]["name"], "task": self.config["task"]}

    @abstractmethod
    def curve_table(self, results: pd.DataFrame) -> pd.DataFrame:
        """The per-layer curves: one row per (value, layer) with `CURVE_COLUMNS` (and extras).

        The one place the curves' mean and 95% band are computed (via `mmflow.analyses.curves`);
        the report's figures, the headline and W&B all read this table.
        """

    def headline(self, results: pd.DataFrame) -> dict[str, Any]:
        """The cell's headline numbers (written to cell.json): the curve's minimum and where it is."""
        if self.minimum_of is None or not len(results):
            return {}
        from mmflow.analyses.curves import curve_minimum

        return curve_minimum(self.curve_table(results), self.minimum_of)

    @property
    @abstractmethod
    def labels(self) -> Labels:
        """Names of this cell in tables, legends and W&B."""

    def figure(self, cell: Any) -> Figure | None:
        """The figure of one finished cell (a `mmflow.storage.cell_data.CellData`), or None if it has none."""
        return None

    @classmethod
    def validate(cls, config: Mapping[str, Any]) -> None:
        """Raise `mmflow.config.checks.CellConfigError` (naming the key) unless this analysis's own keys in
        `config` can compute something; called before any model loads (`mmflow.config.validate`).
        Default: nothing to check."""
        return None

    @classmethod
    def canonical(cls, config: dict[str, Any]) -> dict[str, Any]:
        """The cell config as its cell id sees it (default: as it is). An analysis whose config gained
        a key whose default means "as before" drops it here, so cells computed before keep their ids."""
        return config

    @classmethod
    def report_sections(cls, cells: Sequence[Any]) -> list[tuple[str, list[FigureSpec]]]:
        """The report's sections: (title, figures). `cells` are all finished cells of the report (an
        analysis may draw others beside its own); by default one figure per cell of this analysis."""
        figures = []
        for cell in (c for c in cells if c.kind == cls.name):
            figure = cell.analysis.figure(cell)
            if figure is not None:
                stem = "__".join((cls.name, cell.model, cell.task, cell.cell_id))
                figures.append(FigureSpec(stem, f"{cell.model_title} — {cell.task}", figure))
        return [(cls.title(), figures)] if figures else []

    @classmethod
    def title(cls) -> str:
        """The analysis's name in headings."""
        return cls.name.replace("_", " ").capitalize()

    def comparison_key(self) -> str | None:
        """Cells of the same task and key are compared across models (None: not compared)."""
        return None

    @classmethod
    def plot_comparison(cls, cells: Sequence[Any]) -> Figure | None:
        """The across-models figure of cells sharing task and `comparison_key` (relative depth)."""
        return None


CURVE_COLUMNS = ["value", "label", "layer", "n", "mean", "sem", "ci_low", "ci_high"]
# The analyses shipped with mmflow: name -> the module that registers it, imported only when a cell of
# that analysis is validated, read or run (planning a sweep imports none of them).
ANALYSES: dict[str, str] = {
    "answer_tracking": "mmflow.analyses.answer_tracking",
    "attribution": "mmflow.analyses.attribution",
    "knockout": "mmflow.analyses.knockout",
    "patching": "mmflow.analyses.patching",
}
_REGISTRY: dict[str, type[Analysis]] = {}


def register(cls: type[Analysis]) -> type[Analysis]:
    """Class decorator: make `cls` the analysis named `cls.name`."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"analysis {cls.name!r} is registered twice")
    unknown = set(cls.uses) - CAPABILITIES
    if unknown:
        raise ValueError(f"analysis {cls.name!r} uses {sorted(unknown)}; known: {sorted(CAPABILITIES)}")
    _REGISTRY[cls.name] = cls
    return cls


def known_analyses() -> list[str]:
    """Names of the analyses that can be used: the shipped ones (`ANALYSES`) and registered plug-ins."""
    return sorted(set(ANALYSES) | set(_REGISTRY))


def analysis_class(name: str) -> type[Analysis]:
    """The analysis class named `name` (importing its module from `ANALYSES`); ValueError if none."""
    if name not in _REGISTRY and name in ANALYSES:
        importlib.import_module(ANALYSES[name])
    if name not in _REGISTRY:
        raise ValueError(f"unknown analysis {name!r}; known: {', '.join(known_analyses())}")
    return _REGISTRY[name]


def analysis_for(config: Mapping[str, Any]) -> Analysis:
    """The analysis of a resolved cell config (its `analysis` key), not yet bound to a model."""
    return analysis_class(str(config.get("analysis", DEFAULT_ANALYSIS)))(config)


def canonical_config(config: dict[str, Any]) -> dict[str, Any]:
    """A resolved cell config as its analysis ids it (`Analysis.canonical`): what the cell store keeps."""
    return analysis_class(str(config.get("analysis", DEFAULT_ANALYSIS))).canonical(config)


def make_analysis(config: Mapping[str, Any], loaded: LoadedModel) -> Analysis:
    """The analysis of a cell config, bound to the model it runs on (what the runtime uses)."""
    return analysis_for(config).bind(loaded)
