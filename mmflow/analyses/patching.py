"""Activation patching: how much of the clean answer restoring one token group's clean states recovers.

For each sample a corrupted run is made (`corruption`: noise on the image embeddings, a
counterfactual image, or a blank image; `mmflow.patching.corrupt`). Then, for each restored group
G (`patching.groups`) and each centre layer l, the clean run's layer inputs of G are restored in the
corrupted run at every layer of the window around l (the knockouts' window rule), and the
probability of the clean answer token (the clean run's top-1, as for knockouts) is read at the last
position: recovered_frac = (p_patched - p_corrupt) / (p_clean - p_corrupt). Samples whose corruption
lowers p by less than `patching.margin` (absolute probability) are skipped with reason
`corruption_too_weak`. Knockouts say whether a route is necessary; restoring says whether the
states it carries are sufficient.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch

from mmflow.analyses.base import Analysis, Labels, SamplePlan, register
from mmflow.analyses.curves import curve_stats
from mmflow.config.checks import check_choice, check_int, check_window, window_for_depth
from mmflow.data.sample import TASKS, Sample, Skip
from mmflow.errors import CellConfigError, SampleSkip
from mmflow.inputs.groups import GROUP_NAMES, TokenGroups
from mmflow.knockout.spec import GROUP_LABELS, window_layers
from mmflow.patching.corrupt import (
    CORRUPTIONS,
    calibration_samples,
    embedding_std,
    make_corruption,
    pair_counterfactuals,
)

if TYPE_CHECKING:
    from mmflow.execution.engines import Engines
    from mmflow.knockout.clean_pass import CleanPass
    from mmflow.models.registry import LoadedModel
    from mmflow.patching.restore import RestoreJob

RESULT_COLUMNS = [
    "question_id",
    "group",
    "layer",
    "window",
    "p_clean",
    "p_corrupt",
    "p_patched",
    "recovered_frac",
    "logp_corrupt_change",
    "logp_patched_change",
    "top1_patched",
    "corruption",
    "corrupt_source",
    "model",
    "task",
]
RESULT_TYPES = {
    **{c: "string" for c in ("question_id", "group", "corruption", "corrupt_source", "model", "task")},
    "layer": "int64",
    "window": "int64",
    **{c: "float64" for c in ("p_clean", "p_corrupt", "p_patched", "recovered_frac")},
    "logp_corrupt_change": "float64",
    "logp_patched_change": "float64",
    "top1_patched": "bool",
}
ALL = "all"  # every position of the sequence (restoring it at layer 0 gives the clean run)


def group_positions(groups: TokenGroups, name: str) -> torch.Tensor:
    """Sorted positions of a restored group: a token group, `all`, or a union such as `question+last`.

    Raises `GroupError('empty_group')` if it is empty, KeyError for an unknown name.
    """
    if name == ALL:
        return torch.arange(int(groups.last.max()) + 1)
    parts = [part.strip() for part in name.split("+")]
    for part in parts:
        if part not in GROUP_NAMES:
            raise KeyError(f"unknown token group {part!r} in {name!r}; known: {GROUP_NAMES + (ALL,)}")
    positions = torch.cat([groups.require(part) for part in parts]).unique(sorted=True)
    return positions


def group_label(name: str) -> str:
    """Legend text of a restored group ("Image", "Question + Last")."""
    if name == ALL:
        return "All positions"
    return " + ".join(GROUP_LABELS.get(part, part) for part in name.split("+"))


@register
class PatchingAnalysis(Analysis):
    """Restore each group in the window around every centre layer of a corrupted run.

    Config (`conf/analysis/patching.yaml`): `window`, `corruption` (noise | counterfactual |
    blank), `patching` (groups, noise_scale, margin); `engine.name` picks the patcher, which the
    runtime builds and hands over (`uses`: restores).
    """

    name = "patching"
    uses = frozenset({"restores"})
    curve_role = "recovery"
    config_keys = ("window",)
    result_columns = RESULT_COLUMNS
    result_types = RESULT_TYPES
    sort_by = ["question_id", "group", "layer"]
    value_columns = ()  # per restored group: logged at the end, no running mean over groups

    @classmethod
    def validate(cls, config) -> None:
        """A known corruption, a seed >= 0 if given, window in 1..n_layers, `patching.noise_scale` and
        `patching.margin` numbers (their one default is conf/analysis/patching.yaml's)."""
        check_choice("corruption", config.get("corruption", "noise"), CORRUPTIONS)
        if "seed" in config:
            check_int(config, "seed", 0)
        check_window(config)
        patching = config.get("patching") or {}
        for key in ("noise_scale", "margin"):
            value = patching.get(key)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise CellConfigError(f"patching.{key}", value, "must be a number (see conf/analysis)")
        names = patching.get("groups")
        if not isinstance(names, list | tuple) or not names:
            raise CellConfigError("patching.groups", names, "must be a non-empty list of token groups")
        for name in names:
            parts = [] if name == ALL else [part.strip() for part in str(name).split("+")]
            if any(part not in GROUP_NAMES for part in parts):
                known = ", ".join((*GROUP_NAMES, ALL))
                raise CellConfigError(
                    "patching.groups", names, f"{name!r} names no token group; known: {known}"
                )

    def __init__(self, config) -> None:
        super().__init__(config)
        patching = self.config.get("patching") or {}
        self.corruption = self.config.get("corruption", "noise")
        self.groups = list(patching.get("groups", ["image", "question", "last"]))
        self.width = int(self.config["window"])
        self.noise_scale = float(patching["noise_scale"])  # defaults: conf/analysis/patching.yaml only
        self.margin = float(patching["margin"])
        self.seed = int(self.config.get("seed", 0))
        if self.corruption not in CORRUPTIONS:
            raise ValueError(f"corruption must be one of {CORRUPTIONS}, got {self.corruption!r}")
        if not self.groups:
            raise ValueError("patching.groups is empty: name at least one token group to restore")
        if self.margin < 0 or self.noise_scale <= 0:
            raise ValueError(
                f"patching.margin must be >= 0 and noise_scale > 0, got {self.margin}, {self.noise_scale}"
            )
        configured = patching.get("noise_sd")
        self.noise_sd: float | None = None if configured is None else float(configured)
        self.per_task = int(patching.get("calibration_per_task", 4))
        if (self.noise_sd is not None and self.noise_sd <= 0) or self.per_task < 1:
            raise ValueError(
                "patching.noise_sd must be > 0 (or null: measured) and patching.calibration_per_task >= 1, "
                f"got {configured}, {self.per_task}"
            )
        self.calibration: dict[str, Any] = (
            {} if self.noise_sd is None else {"noise_sd": self.noise_sd, "how": "configured"}
        )
        self.counterfactuals: dict[str, Sample] = {}

    def bind(self, loaded: LoadedModel) -> PatchingAnalysis:
        self.n_layers = loaded.n_layers
        self.width = window_for_depth(self.config, loaded.n_layers, loaded.weights)  # the loaded depth
        return super().bind(loaded)

    @property
    def labels(self) -> Labels:
        model, task = str(self.config["model"]["name"]), str(self.config["task"])
        return Labels(
            variant=f"patching_{self.corruption}",
            legend=f"patching (corruption = {self.corruption})",
            tags=(model, task, f"window={self.width}", self.name),
            order=(self.corruption,),
            window=self.width,
        )

    def curve_table(self, results: pd.DataFrame) -> pd.DataFrame:
        """One curve per restored group: value `recovered_pct/<group>`, the recovered fraction in %."""
        frames = (
            [
                curve_stats(part, "recovered_frac", scale=100.0).assign(
                    value=f"recovered_pct/{g}", label=group_label(g)
                )
                for g, part in results.groupby("group", sort=False)
            ]
            if len(results)
            else []
        )
        columns = ["value", "label", "layer", "n", "mean", "sem", "ci_low", "ci_high"]
        return pd.concat(frames, ignore_index=True)[columns] if frames else pd.DataFrame(columns=columns)

    def figure(self, cell: Any):
        from mmflow.analyses.patching_figures import plot_necessity_sufficiency

        return plot_necessity_sufficiency([], [cell]) if len(cell.results) else None

    @classmethod
    def report_sections(cls, cells: Sequence[Any]) -> list:
        from mmflow.analyses.patching_figures import patching_sections

        return patching_sections(cells)

    def prepare(self, samples: Sequence[Sample | Skip]) -> None:
        """Before the first sample: the counterfactual pairs, or the noise's sd (configured, else
        measured over the model's and data source's calibration set, `calibrate`)."""
        if self.corruption == "counterfactual":
            self.counterfactuals = pair_counterfactuals(samples)
        if self.corruption == "noise" and self.noise_sd is None:
            self.calibration = calibrate(self.loaded, self.config, self.per_task)
            self.noise_sd = float(self.calibration["noise_sd"])

    def record(self) -> dict[str, Any]:
        """What `cell.json` keeps of this analysis's run: the noise scale and its calibration set."""
        return {"noise_calibration": self.calibration} if self.calibration else {}

    @property
    def data_source(self) -> str:
        """The data source's identity (as the cell id has it), part of the noise seed."""
        return data_source_key(self.config)

    def plan(self, groups: TokenGroups, sample: Sample) -> SamplePlan:
        """No knockouts; the state is each restored group's positions, and the clean pass keeps layer
        inputs from the first of them. `GroupError` skips the sample if a group is empty.

        The restores run in `rows`: they need this cell's corrupted run, and whether it is strong
        enough (`corruption_too_weak`), first."""
        positions = {name: group_positions(groups, name) for name in self.groups}
        return SamplePlan(keep_from=min(int(p.min()) for p in positions.values()), state=positions)

    def restore_jobs(self, positions: dict[str, torch.Tensor]) -> list[RestoreJob]:
        """One job per group and centre layer, group-major."""
        from mmflow.patching.restore import RestoreJob

        return [
            RestoreJob(positions[name], window_layers(centre, self.width, self.n_layers))
            for name in self.groups
            for centre in range(self.n_layers)
        ]

    def rows(
        self,
        sample: Sample,
        clean: CleanPass,
        token_id: int,
        plan: SamplePlan,
        outputs: torch.Tensor,
        engines: Engines,
    ) -> list[dict]:
        """Rows for one sample, group-major then centre layer (restored with `engines`' patcher);
        `SampleSkip('corruption_too_weak')` if the corruption lowers p(answer) by less than the margin."""
        positions: dict[str, torch.Tensor] = plan.state
        inputs = clean.inputs
        image = image_positions(self.loaded, inputs)
        corruption = make_corruption(
            self.loaded,
            self.corruption,
            sample,
            inputs,
            image,
            sd=self.noise_sd,
            scale=self.noise_scale,
            seed=self.seed,
            counterfactual=self.counterfactuals.get(sample.question_id),
            data_source=self.data_source,
        )
        first_target = int(plan.keep_from)
        corrupted = engines.corrupted(corruption, first_target)
        logp_clean, logp_corrupt = float(clean.logprobs[token_id]), float(corrupted.logprobs[token_id])
        p_clean, p_corrupt = math.exp(logp_clean), math.exp(logp_corrupt)
        if p_clean - p_corrupt < self.margin or p_clean <= p_corrupt:
            detail = f"p_clean={p_clean:.4g} p_corrupt={p_corrupt:.4g} margin={self.margin:g}"
            raise SampleSkip("corruption_too_weak", detail)
        states = engines.clean_states(clean, first_target)
        patched = engines.restore(corrupted, states, self.restore_jobs(positions))
        top1 = patched.argmax(dim=-1).tolist()
        constant = {
            "question_id": sample.question_id,
            "window": self.width,
            "p_clean": p_clean,
            "p_corrupt": p_corrupt,
            "logp_corrupt_change": logp_corrupt - logp_clean,
            "corruption": self.corruption,
            "corrupt_source": corruption.source,
            **self.row_labels,
        }
        out = []
        for index, (name, layer) in enumerate((n, c) for n in self.groups for c in range(self.n_layers)):
            logp = float(patched[index, token_id])
            row = {
                **constant,
                "group": name,
                "layer": layer,
                "p_patched": math.exp(logp),
                "recovered_frac": (math.exp(logp) - p_corrupt) / (p_clean - p_corrupt),
                "logp_patched_change": logp - logp_corrupt,
                "top1_patched": top1[index] == token_id,
            }
            out.append({column: row[column] for column in RESULT_COLUMNS})
        return out

    def headline(self, results: pd.DataFrame) -> dict:
        """Per group: the highest mean recovered fraction (%) over samples and its centre layer."""
        if not len(results):
            return {}
        out: dict[str, Any] = {}
        curves = results.groupby(["group", "layer"])["recovered_frac"].mean() * 100.0
        for group, curve in curves.groupby(level="group"):
            curve = curve.droplevel("group")
            out[f"max_recovered_pct/{group}"] = float(curve.max())
            out[f"max_layer/{group}"] = int(curve.idxmax())
        return out


def data_source_key(config: Mapping[str, Any]) -> str:
    """A short digest of the data config as the cell id sees it (`store.semantic_config`)."""
    from mmflow.storage.store import semantic_config

    data = semantic_config(dict(config)).get("data")
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


_CALIBRATED: dict[tuple, dict[str, Any]] = {}  # (model, data source, per task) -> calibration


def calibrate(loaded: LoadedModel, config: Mapping[str, Any], per_task: int) -> dict[str, Any]:
    """The image embeddings' sd over the data source's calibration set (`calibration_samples`: the
    first `per_task` samples of every task), once per model and data source in this process."""
    from mmflow.execution.runtime import load_samples  # the runtime drives this analysis: no import at load

    key = (id(loaded.model), data_source_key(config), per_task)
    if key not in _CALIBRATED:
        load = lambda task, n: load_samples({**config, "task": task, "n_samples": n})  # noqa: E731
        chosen = calibration_samples(load, TASKS, per_task)
        _CALIBRATED[key] = {
            "noise_sd": embedding_std(loaded, chosen),
            "how": f"measured over the first {per_task} samples of every task of the data source",
            "question_ids": [f"{s.task}/{s.question_id}" for s in chosen],
        }
    return _CALIBRATED[key]


def image_positions(loaded: LoadedModel, inputs) -> torch.Tensor:
    """The image positions of `inputs` (where the noise goes)."""
    return torch.nonzero(inputs.input_ids.cpu() == loaded.model.config.image_token_id).flatten()
