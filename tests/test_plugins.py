"""Analyses are plug-ins: nothing outside `mmflow/analyses/` switches on an analysis's name.

The validator, the store, W&B and the report ask the analysis (`mmflow.analyses.base.Analysis`);
this test reads every module with `ast` and fails on a comparison with an analysis name.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from mmflow.analyses import Analysis, SamplePlan, known_analyses, register
from mmflow.analyses.base import _REGISTRY
from mmflow.config.validate import validate_cell
from mmflow.errors import CellConfigError

ROOT = Path(__file__).resolve().parents[1]


def name_switches(path: Path, names: set[str]) -> list[str]:
    """`x == "knockout"`, `x in ("knockout", ...)` and the like in one module, as "path:line"."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.Compare):
            continue
        for side in [node.left, *node.comparators]:
            constants = side.elts if isinstance(side, ast.Tuple | ast.List | ast.Set) else [side]
            if any(isinstance(c, ast.Constant) and c.value in names for c in constants):
                where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name
                found.append(f"{where}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_nothing_outside_the_analyses_tests_an_analysis_name():
    names = set(known_analyses())
    assert {"knockout", "answer_tracking", "patching"} <= names
    paths = [p for package in ("mmflow", "hydra_plugins") for p in sorted((ROOT / package).rglob("*.py"))]
    assert len(paths) > 50
    bad = [
        hit
        for path in paths
        if "analyses" not in path.relative_to(ROOT).parts[:2]
        for hit in name_switches(path, names)
    ]
    assert not bad, "ask the analysis instead of testing its name:\n" + "\n".join(bad)


def test_the_walk_finds_a_name_switch(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text('def f(a):\n    return a["analysis"] == "patching" or a in ("knockout",)\n')
    assert len(name_switches(probe, {"patching", "knockout"})) == 2


def test_a_registered_analysis_validates_its_own_keys(tmp_path):
    @register
    class Counting(Analysis):
        name = "counting_test"
        result_columns = ["question_id", "layer"]

        @classmethod
        def validate(cls, config) -> None:
            if config.get("count", 0) < 1:
                raise CellConfigError("count", config.get("count"), "must be >= 1")

        def plan(self, groups, sample):
            return SamplePlan()

        def rows(self, sample, clean, token_id, plan, outputs, engines):
            return []

        def curve_table(self, results):
            return results

        @property
        def labels(self):
            raise NotImplementedError

    base = {
        "task": "ChooseAttr",
        "analysis": "counting_test",
        "data": {"name": "shapes", "seed": 0},
        "engine": {"name": "fast", "attention": "sdpa"},
        "require_correct": False,
        "n_samples": 1,
        "max_new_tokens": 1,
    }
    try:
        validate_cell({**base, "count": 2})
        with pytest.raises(CellConfigError) as err:
            validate_cell({**base, "count": 0})
        assert err.value.key == "count"
        with pytest.raises(CellConfigError) as err:
            validate_cell({**base, "analysis": "nonexistent"})
        assert err.value.key == "analysis" and "knockout, patching" in str(err.value)
    finally:
        _REGISTRY.pop("counting_test", None)
