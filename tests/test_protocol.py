"""The analysis protocol (`mmflow.analyses.base`): plans, one knockout batch per sample, engines the
runtime owns, no per-sample state on an analysis, and the explicit registry."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import cell_config, noise_sample

import mmflow.execution.engines as engines_module
from mmflow.analyses import ANALYSES, CAPABILITIES, analysis_class, make_analysis
from mmflow.config.parts import EngineSpec
from mmflow.errors import SampleSkip
from mmflow.execution.engines import Engines
from mmflow.execution.runtime import run_cells
from mmflow.inputs.encode import encode
from mmflow.inputs.groups import build_token_groups

FAST = {"name": "fast", "attention": "sdpa"}


class CountingEngine:
    """The real engine, with every `run` recorded as (id of the clean pass, number of jobs)."""

    def __init__(self, engine, calls: list[tuple[int, int]]) -> None:
        self._engine, self._calls = engine, calls

    def run(self, clean, jobs):
        self._calls.append((id(clean), len(jobs)))
        return self._engine.run(clean, jobs)

    def __getattr__(self, name):
        return getattr(self._engine, name)


def batch_configs(folder: Path) -> list[dict]:
    """Five cells of one cell batch: two knockouts, answer tracking, patching and attribution."""
    common = dict(engine=FAST, n_samples=2)
    return [
        cell_config(folder, **common),
        cell_config(
            folder, **common, knockout={"name": "question_to_last", "source": "question", "target": "last"}
        ),
        cell_config(folder, **common, analysis="answer_tracking", lens="norm"),
        cell_config(
            folder,
            **common,
            analysis="patching",
            corruption="counterfactual",
            patching={"groups": ["image"], "margin": 0.0, "noise_scale": 3.0},
        ),
        cell_config(folder, **common, analysis="attribution", attribution={"top_k": 2, "controls": 1}),
    ]


def test_every_cells_knockouts_of_a_sample_go_to_the_engine_in_one_run(tiny_llava, tmp_path, monkeypatch):
    calls: list[tuple[int, int]] = []
    built: Counter[str] = Counter()
    real_engine = engines_module.make_engine

    def counting_engine(*args, **kwargs):
        built["engine"] += 1
        return CountingEngine(real_engine(*args, **kwargs), calls)

    import mmflow.patching.restore as restore

    real_patcher = restore.make_patcher

    def counting_patcher(*args, **kwargs):
        built["patcher"] += 1
        return real_patcher(*args, **kwargs)

    monkeypatch.setattr(engines_module, "make_engine", counting_engine)
    monkeypatch.setattr(restore, "make_patcher", counting_patcher)
    outcomes = run_cells(tiny_llava, batch_configs(tmp_path))
    assert [o.status for o in outcomes] == ["done"] * 5, [o.error for o in outcomes]
    assert built == {"engine": 1, "patcher": 1}  # once per cell batch, not per analysis
    n_layers = tiny_llava.n_layers
    per_clean: dict[int, list[int]] = {}
    for clean, n_jobs in calls:
        per_clean.setdefault(clean, []).append(n_jobs)
    # Per sample: ONE batch with both knockout cells' jobs (L each), then attribution's verification
    # (top_k + controls) from its rows. Answer tracking and patching add no knockout job.
    assert list(per_clean.values()) == [[2 * n_layers, 3], [2 * n_layers, 3]]
    metas = [json.loads((Path(o.path) / "cell.json").read_text()) for o in outcomes]
    assert {m["clean_passes_per_sample"] for m in metas} == {1}
    results = [pd.read_parquet(Path(o.path) / "results.parquet") for o in outcomes]
    assert [len(r) for r in results[:2]] == [2 * n_layers, 2 * n_layers]
    assert results[4]["verified"].sum() == 2 * 3
    # Without a restoring cell, no patcher is built.
    calls.clear()
    built.clear()
    outcomes = run_cells(
        tiny_llava, [c for c in batch_configs(tmp_path / "b") if c["analysis"] != "patching"]
    )
    assert [o.status for o in outcomes] == ["done"] * 4 and built == {"engine": 1}


def test_a_capability_not_declared_is_refused(tiny_llava):
    engines = Engines(tiny_llava, engine=object(), granted=frozenset({"knockouts"}))
    with pytest.raises(PermissionError, match="'restores'"):
        engines.corrupted(None, 0)
    with pytest.raises(ValueError, match="gradients"):
        engines.only({"gradients"})
    assert engines.only(set()).granted == frozenset()


def snapshot(analysis) -> dict:
    """The analysis's attributes, as identities and (for plain values) values."""
    return {k: (id(v), repr(v)) for k, v in vars(analysis).items()}


@pytest.mark.parametrize("kind", ["patching", "attribution"])
def test_no_per_sample_state_is_kept_on_the_analysis(tiny_llava, tmp_path, kind):
    changes = {"patching": {"noise_sd": 0.5, "margin": 0.0, "noise_scale": 3.0}} if kind == "patching" else {}
    config = cell_config(tmp_path, analysis=kind, engine=FAST, **changes)
    analysis = make_analysis(config, tiny_llava)
    engines = Engines.build(tiny_llava, EngineSpec(**FAST), analysis.uses)
    rng = np.random.default_rng(0)
    samples = [noise_sample(tmp_path, rng) for _ in range(2)]
    analysis.prepare(samples)
    before = snapshot(analysis)
    prepared = []
    for sample in samples:
        inputs = encode(tiny_llava, sample)
        plan = analysis.plan(build_token_groups(tiny_llava, inputs, sample), sample)
        prepared.append((sample, inputs, plan))
    assert snapshot(analysis) == before  # planning kept nothing on the analysis

    def rows(sample, inputs, plan):
        clean = engines.engine.clean(inputs, first_target=plan.first_target)
        try:
            return analysis.rows(sample, clean, clean.top1, plan, torch.empty(0), engines.only(analysis.uses))
        except SampleSkip as skip:
            return skip.reason

    # Rows in the other order than the plans, and each sample again after the other: the same rows.
    backwards = [rows(*item) for item in reversed(prepared)][::-1]
    assert snapshot(analysis) == before
    forwards = [rows(*item) for item in prepared]
    for back, forth in zip(backwards, forwards, strict=True):  # NaN (attribution's unverified) == NaN
        if isinstance(back, str) or isinstance(forth, str):
            assert back == forth
        else:
            pd.testing.assert_frame_equal(pd.DataFrame(back), pd.DataFrame(forth), check_exact=True)
    assert any(isinstance(r, list) and len(r) > 0 for r in forwards)
    for (sample, _, _), got in zip(prepared, forwards, strict=True):
        assert isinstance(got, str) or {row["question_id"] for row in got} == {sample.question_id}


def test_analyses_are_named_in_one_table():
    assert set(ANALYSES) == {"knockout", "answer_tracking", "patching", "attribution"}
    for name, module in ANALYSES.items():
        cls = analysis_class(name)
        assert cls.name == name and cls.__module__ == module
        assert cls.uses <= CAPABILITIES
    assert analysis_class("knockout").uses == {"knockouts"}
    assert analysis_class("answer_tracking").uses == frozenset()
    assert analysis_class("patching").uses == {"restores"}
    assert analysis_class("attribution").uses == {"gradients", "knockouts"}


def test_a_plugin_with_an_unknown_capability_is_refused():
    from mmflow.analyses import Analysis, register
    from mmflow.analyses.base import _REGISTRY

    class Odd(Analysis):
        name = "test_odd_capability"
        uses = frozenset({"telepathy"})

    with pytest.raises(ValueError, match="telepathy"):
        register(Odd)
    assert "test_odd_capability" not in _REGISTRY
