"""Command-line overrides refused in one line before Hydra composes: a misspelt key, a group option
that does not exist, an unknown task (`mmflow.config.overrides`)."""

from __future__ import annotations

import sys

import pytest

from mmflow.cli import run_hydra
from mmflow.config.overrides import check_overrides, partly_bad


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["n_sampels=3"], "n_sampels=3: unknown key; did you mean n_samples?"),
        (["model.nlayers=2"], "model.nlayers=2: unknown key; did you mean model.n_layers?"),
        (
            ["-m", "model=tiny-lava,tiny-lava-next"],
            "model=tiny-lava,tiny-lava-next: no model option 'tiny-lava' in conf/model/; did you mean "
            "model=tiny-llava?; no model option 'tiny-lava-next' in conf/model/; "
            "did you mean model=tiny-llava-next?",
        ),
        (
            ["analysis=atribution"],
            "analysis=atribution: no analysis option 'atribution' in conf/analysis/; "
            "did you mean analysis=attribution?",
        ),
        (["task=ChoseAttr"], "task=ChoseAttr: unknown task 'ChoseAttr'; did you mean task=ChooseAttr?"),
        (
            ["-cn", "smok"],
            "-cn smok: no such sweep in sweeps/ (or conf/, or a -cd folder); did you mean -cn smoke?",
        ),
        (["patching.margn=0.1"], "patching.margn=0.1: unknown key; did you mean patching.margin?"),
    ],
)
def test_a_bad_override_is_one_line_naming_the_closest_real_one(args, line, monkeypatch, capsys) -> None:
    assert check_overrides(args) == line
    monkeypatch.setattr(sys, "argv", ["mmflow run", *args])
    assert run_hydra() == 2
    assert capsys.readouterr().err == f"[mmflow] error: {line}\n"


@pytest.mark.parametrize(
    "args",
    [
        ["-m", "task=ChooseAttr,CompareAttr", "model=tiny-llava,toy-llava", "window=1,3"],
        ["model.n_layers=2", "model.resources.gpus=2", "engine.attention=eager", "data.image_dir=/x"],
        ["patching.margin=0.1", "attribution.top_k=3", "corruption=blank", "knockout.source=image"],
        ["+n_sampels=3"],  # added keys are known_keys' to refuse, with the cell's own composition
        ["hydra.launcher.ray.init.address=auto", "results_dir=${oc.env:HOME}/r", "window=choice(1,3)"],
        ["-cn", "paper", "logger=none", "parity=corrected", "data=table", "data.path=/t.csv"],
    ],
)
def test_valid_overrides_pass(args) -> None:
    assert check_overrides(args) is None


def test_a_sweep_with_some_bad_values_runs_and_warns_about_them() -> None:
    """An invalid cell of a sweep fails alone (its neighbours run); the bad values are named up front."""
    args = ["-m", "task=ChooseAttr,NoSuchTask", "model=tiny-llava,tiny-lava"]
    assert check_overrides(args) is None
    assert partly_bad(args) == [
        "task=ChooseAttr,NoSuchTask: unknown task 'NoSuchTask'; tasks: "
        "ChooseAttr, ChooseCat, ChooseRel, CompareAttr, LogicalObj, QueryAttr (those jobs fail alone)",
        "model=tiny-llava,tiny-lava: no model option 'tiny-lava' in conf/model/; did you mean "
        "model=tiny-llava? (those jobs fail alone)",
    ]
    assert partly_bad(["task=ChooseAttr", "n_samples=2"]) == []


def test_options_of_a_folder_of_your_own_count(tmp_path) -> None:
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "my-llava.yaml").write_text("name: my-llava\n")
    assert check_overrides(["model=my-llava"]) is not None
    assert check_overrides(["-cd", str(tmp_path), "model=my-llava"]) is None
    assert check_overrides([f"--config-dir={tmp_path}", "model=my-llava"]) is None


@pytest.mark.parametrize(
    ("arg", "line"),
    [
        (
            "hydra.launcher.executr=local",
            "hydra.launcher.executr=local: unknown key; did you mean hydra.launcher.executor?",
        ),
        (
            "hydra.launcher.ray.init.num_cpu=2",
            "hydra.launcher.ray.init.num_cpu=2: unknown key; did you mean "
            "hydra.launcher.ray.init.num_cpus? (another ray.init argument goes in with +)",
        ),
    ],
)
def test_a_misspelt_launcher_setting_is_one_line(arg, line, monkeypatch, capsys) -> None:
    from mmflow.cli import launcher_key_error

    assert launcher_key_error([arg]) == line
    monkeypatch.setattr(sys, "argv", ["mmflow run", "-m", arg])
    assert run_hydra() == 2 and capsys.readouterr().err == f"[mmflow] error: {line}\n"
    for fine in (
        "hydra.launcher.executor=local",
        "+hydra.launcher.ray.init.foo=1",
        "hydra.launcher.models.m.gpus=1",
    ):
        assert launcher_key_error([fine]) is None
