"""The sweep driver at scale: fast composition equals Hydra's, the plan's counts, the record, the
grouped failure summary. In-process through the real launcher (no Ray, no model weights)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmflow.bench.driver import Driver, fabricate, grid
from mmflow.sweep.core import CellJob, Sweep
from mmflow.sweep.record import read_events
from mmflow.sweep.settings import SweepSettings


@pytest.fixture
def driver(tmp_path: Path):
    d = Driver(tmp_path / "results", tmp_path / "sweeps")
    yield d
    d.close()


def common(tmp_path: Path) -> list[str]:
    return [f"results_dir={tmp_path / 'results'}", "logger=none"]


def hydra_cell_id(tmp_path: Path, overrides: list[str]) -> str:
    """The cell id Hydra's own full composition of these overrides gives (the slow, sure path)."""
    from hydra import compose
    from hydra.core.hydra_config import HydraConfig

    from mmflow.storage.store import CellStore
    from mmflow.sweep.config import cell_config

    cfg = compose("config", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    cell = cell_config(compose("config", overrides=overrides))
    return CellStore(cell["results_dir"], cell).id


@pytest.mark.parametrize(
    "extra",
    [
        ["task=ChooseCat", "window=3"],  # values on a resolved base (the fast path)
        ["knockout=image_to_last", "n_samples=2"],  # a group and a value
        ["parity=corrected", "model=tiny-llava"],  # a value that an interpolation reads
        ["model.default_window=3"],  # a value `window: ${model.default_window}` reads
        ["+knockout.heads=[0]"],  # an added key: a copy of the base
    ],
)
def test_composed_jobs_name_the_cells_hydra_composes(driver, tmp_path: Path, extra: list[str]) -> None:
    overrides = [*common(tmp_path), *extra]
    launcher = driver.launcher(plan="true")
    launcher.launch([overrides, [*common(tmp_path), "window=1"]], 0)
    job = launcher.last_jobs[0]
    assert job.error is None, job.error
    assert job.cell_id == hydra_cell_id(tmp_path, overrides)


def test_a_bad_override_fails_its_job_alone(driver, tmp_path: Path) -> None:
    launcher = driver.launcher(plan="true")
    launcher.launch([[*common(tmp_path), "model=nope"], [*common(tmp_path), "window=2"]], 0)
    bad, good = launcher.last_jobs
    assert bad.cell is None and "nope" in (bad.error or "")
    assert good.error is None and good.cell["window"] == 2


def test_the_plan_counts_new_cached_partial_and_failed_cells(driver, tmp_path: Path, capsys) -> None:
    jobs = [[*common(tmp_path), *job] for job in grid(12)]  # 12 cells, one task, n_samples=1
    launcher = driver.launcher(plan="true")
    launcher.launch(jobs, 0)
    ids = [job.cell_id for job in launcher.last_jobs]
    cells = {job.cell_id: job.cell for job in launcher.last_jobs}
    for cell_id, state in zip(ids, ["done", "done", "done", "partial", "failed"], strict=False):
        fabricate(cells[cell_id], state, {}, tmp_path / "parquet")
    launcher = driver.launcher(plan="true")
    launcher.launch(jobs, 0)
    plan = launcher.plan
    assert (plan["cells"], plan["new"], plan["cached"], plan["partial"], plan["failed"]) == (12, 7, 3, 1, 1)
    (model,) = plan["models"]
    # the 9 cells to compute share model, task and n_samples: one batch, one actor, one sample
    assert (model["model"], model["cells"], model["batches"], model["actors"]) == ("toy-llava", 9, 1, 1)
    assert model["samples"] == 1 and model["clean_pass_units"] > 1  # the clean pass + its knockouts
    assert model["gpu_hours"] > 0 and model["clean_pass_s_is"] == "estimated"
    assert json.loads((Path(launcher.last_sweep.sweep_dir) / "plan.json").read_text())["cached"] == 3
    out = capsys.readouterr().out
    assert "12 cells: 7 new, 3 cached, 1 partial, 1 failed before" in out
    units = f"{model['clean_pass_units']:,.1f} clean passes"  # the table's figure is the total's
    assert f"to compute: 1 batch, 1 sample, {units}" in out and f"{model['clean_pass_units']:,.1f}" in out
    assert not (tmp_path / "results" / ids[-1]).exists()  # planning computes nothing


def test_a_configured_clean_pass_time_sets_the_gpu_hours(driver, tmp_path: Path) -> None:
    jobs = [[*common(tmp_path), *job] for job in grid(3)]
    launcher = driver.launcher("+hydra.launcher.clean_pass_s.toy-llava=36.0", plan="true")
    launcher.launch(jobs, 0)
    (model,) = launcher.plan["models"]
    assert model["clean_pass_s_is"] == "configured"
    assert model["gpu_hours"] == pytest.approx(model["clean_pass_units"] * 36.0 / 3600, rel=0.05)


def sweep_of(tmp_path: Path, n: int, **settings) -> Sweep:
    """A sweep of `n` valid knockout cells (windows 1..n), never computed."""
    configs = [
        {
            "model": {"name": "m1"},
            "task": "ChooseAttr",
            "data": {"name": "shapes", "seed": 0},
            "engine": {"name": "fast", "attention": "sdpa"},
            "require_correct": False,
            "analysis": "knockout",
            "max_new_tokens": 2,
            "n_samples": 4,
            "window": window,
            "knockout": {"name": "image_to_question", "source": "image", "target": "question"},
            "results_dir": str(tmp_path),
        }
        for window in range(1, n + 1)
    ]
    jobs = [CellJob.resolve(i, [f"window={c['window']}"], lambda c=c: c) for i, c in enumerate(configs)]
    return Sweep("t", tmp_path / "sweep", jobs, SweepSettings(report=False, **settings))


def test_the_record_appends_one_event_per_change_and_rewrites_sweep_json_rarely(tmp_path: Path) -> None:
    from mmflow.sweep.record import write_sweep_json

    sweep = sweep_of(tmp_path, 5, record_every_s=3600)
    write_sweep_json(sweep, "running")
    first = (tmp_path / "sweep" / "sweep.json").stat().st_mtime_ns
    ids = list(sweep.cells)
    for cell_id in ids:
        sweep.record(cell_id, "running", None)
        sweep.record(
            cell_id, "done" if cell_id != ids[0] else "failed", "boom" if cell_id == ids[0] else None
        )
    sweep.events.close()
    lines = (tmp_path / "sweep" / "events.jsonl").read_text().splitlines()
    assert len(lines) == 10  # two changes per cell, nothing else
    assert json.loads(lines[1]) | {"t": 0} == {"t": 0, "cell_id": ids[0], "status": "failed", "error": "boom"}
    assert read_events(tmp_path / "sweep" / "events.jsonl") == {ids[0]: "failed"} | dict.fromkeys(
        ids[1:], "done"
    )
    assert (tmp_path / "sweep" / "sweep.json").stat().st_mtime_ns == first  # not once per cell
    record = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert record["status"] == "running" and record["events"] == "events.jsonl"


def test_a_torn_last_event_line_is_skipped(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_text('{"t": 1, "cell_id": "a", "status": "done"}\n{"t": 2, "cell_id": "b", "sta')
    assert read_events(path) == {"a": "done"}


def test_failures_are_grouped_by_cause_with_count_first_cell_and_fix(tmp_path: Path, capsys) -> None:
    from rich.console import Console

    from mmflow.sweep.record import failure_groups, print_failure_groups

    sweep = sweep_of(tmp_path, 5)
    ids = list(sweep.cells)
    for cell_id in ids[:3]:
        sweep.status[cell_id] = "failed"
        sweep.errors[cell_id] = f"ImportError: No module named 'accelerate' (cell {cell_id})\ntraceback…"
    for cell_id in ids[3:]:
        sweep.status[cell_id] = "failed"
        sweep.errors[cell_id] = "FileNotFoundError: GQA image folder /data/gqa is not set"
    groups = failure_groups(sweep)
    assert [(g["count"], g["first"].split()[0]) for g in groups] == [(3, ids[0]), (2, ids[3])]
    assert groups[0]["cause"] == "ImportError: No module named 'accelerate' (cell <cell>)"
    assert groups[0]["fix"] == "pip install accelerate"
    assert "data.image_dir" in groups[1]["fix"]
    print_failure_groups(Console(width=200), sweep)
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "5 failed (2 causes):"
    assert out[1].startswith("FAILED x3: ImportError") and out[4].startswith("FAILED x2: FileNotFoundError")
    assert len(out) == 7  # one cause line, its first cell and its fix per cause: nothing per cell


def test_run_and_plan_arguments() -> None:
    from mmflow.cli import run_arguments

    assert run_arguments("plan", ["task=A,B"]) == ["-m", "task=A,B", "hydra.launcher.plan=true"]
    assert run_arguments("run", ["-m", "--plan", "x=1"]) == ["-m", "x=1", "hydra.launcher.plan=true"]
    assert run_arguments("run", ["-m", "--no-preflight"]) == ["-m", "hydra.launcher.preflight=false"]
    assert run_arguments("run", ["x=1"]) == ["x=1"]


def test_preflight_reports_one_line_per_root_cause_with_the_cells_it_blocks(tmp_path: Path, caplog) -> None:
    from mmflow.sweep.preflight import preflight

    sweep = sweep_of(tmp_path, 6)
    ids = list(sweep.cells)
    for cell_id in ids[:4]:  # a 34B-like model split with device_map, without accelerate
        sweep.cells[cell_id]["model"] = {"name": "big", "checkpoint": "toy:x", "device_map": "auto"}
    for cell_id in ids[4:]:  # GQA without its image folder
        sweep.cells[cell_id]["data"] = {"name": "gqa", "image_dir": None}
    checks = []
    blocked = preflight(sweep.cells, SweepSettings(), gpus=lambda: checks.append(1) or 0)
    import importlib.util

    has_accelerate = importlib.util.find_spec("accelerate") is not None
    causes = {cause: sorted(cells) for cause, cells in blocked.items()}
    gqa = [c for c in causes if c.startswith("GQA image folder not set")]
    assert len(gqa) == 1 and causes[gqa[0]] == sorted(ids[4:])
    if not has_accelerate:
        (acc,) = [c for c in causes if "accelerate" in c]
        assert causes[acc] == sorted(ids[:4])
    assert len(causes) == (1 if has_accelerate else 2)
    assert len(checks) <= 1  # the GPU count is asked once, not per cell

    sweep.settings = SweepSettings(report=False)
    caplog.set_level("WARNING", logger="mmflow.sweep")
    todo = sweep.preflight(dict(sweep.cells))
    assert set(todo) == set(ids) - {c for cells in blocked.values() for c in cells}
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("preflight:")]
    assert (
        "preflight: GQA image folder not set or missing (None): set data.image_dir or GQA_IMAGE_DIR "
        "(blocks 2 cells)" in lines
    )
    assert len(lines) == len(causes)
    assert sweep.status[ids[5]] == "failed" and sweep.errors[ids[5]].startswith("preflight: GQA image folder")


def test_preflight_checks_a_tables_image_folder_and_columns_before_any_model_loads(tmp_path: Path) -> None:
    from mmflow.sweep.causes import cause_of
    from mmflow.sweep.preflight import data_problem

    table = tmp_path / "t.csv"
    table.write_text("qid,file,question,answer,image_w,image_h,objects\n1,a.jpg,What?,red,4,4,[]\n")
    data = {"name": "table", "path": str(table), "image_dir": str(tmp_path / "nodir")}
    problem = data_problem(data, "QueryAttr")
    assert problem == f"table image folder not found: {tmp_path / 'nodir'} (data.image_dir of {table})"
    assert cause_of(problem)[1] == "set data.image_dir to the folder the table's image column is relative to"
    (tmp_path / "imgs").mkdir()
    data["image_dir"] = str(tmp_path / "imgs")
    problem = data_problem(data, "QueryAttr")
    assert problem is not None and "lacks column(s) question_id, image for task QueryAttr" in problem
    assert "data.columns" in cause_of(problem)[1]
    data["columns"] = {"qid": "question_id", "file": "image"}
    assert data_problem(data, "QueryAttr") is None


def test_preflight_checks_the_first_rows_images_and_a_missing_checkpoint(tmp_path: Path, monkeypatch) -> None:
    from mmflow.sweep.preflight import checkpoint_problem, data_problem

    (tmp_path / "imgs").mkdir()
    problem = data_problem({"name": "gqa", "image_dir": str(tmp_path / "imgs")}, "ChooseAttr")
    assert (
        problem is not None and problem.startswith("warning: ") and "lacks the first rows' images" in problem
    )
    assert data_problem({"name": "shapes"}, "ChooseAttr") is None
    assert checkpoint_problem({"name": "m", "checkpoint": "toy:toy-llava"}) is None
    assert "does not exist" in checkpoint_problem({"name": "m", "checkpoint": str(tmp_path / "none")})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert "not in the Hugging Face cache" in checkpoint_problem(
        {"name": "m", "checkpoint": "org/never-cached"}
    )


def test_a_failed_sweep_ends_with_its_grouped_failures_and_exit_code_1(
    driver, tmp_path: Path, capsys
) -> None:
    from mmflow.sweep.core import SweepFailed

    launcher = driver.launcher()
    jobs = [[*common(tmp_path), "window=0"], [*common(tmp_path), "window=0", "task=ChooseCat"]]
    with pytest.raises(SweepFailed) as raised:
        launcher.launch(jobs, 0)
    assert raised.value.code == 1
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-4] == "2 failed (1 cause):"
    assert out[-3].startswith("FAILED x2: CellConfigError: window") and out[-2].startswith("    first: ")
    assert out[-1] == "    fix: fix the named key on the command line or in the sweep's YAML"
    assert sorted(p.parent.parent.name for p in Path(launcher.last_sweep.sweep_dir).glob("*/.hydra/*")) == [
        "0",
        "1",
    ]  # each job's overrides.yaml, and nothing else of Hydra's per job


def test_missing_first_images_warn_once_and_block_nothing(tmp_path: Path, caplog) -> None:
    from mmflow.sweep.preflight import preflight

    (tmp_path / "imgs").mkdir()
    sweep = sweep_of(tmp_path, 3)
    for cell in sweep.cells.values():
        cell["data"] = {"name": "gqa", "image_dir": str(tmp_path / "imgs")}
    caplog.set_level("WARNING", logger="mmflow.sweep")
    assert preflight(sweep.cells, SweepSettings()) == {}  # missing images are per-sample skips
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("preflight:")]
    assert "lacks the first rows' images" in line and line.endswith("(3 cells)")


def test_the_command_line_sweep_composes_each_job_once_and_a_bad_value_fails_alone(tmp_path: Path) -> None:
    """Hydra's basic sweeper would compose every job up front and stop the whole sweep at the first
    value that does not compose; mmflow's sweeper leaves that to the launcher (job by job)."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    mine = tmp_path / "mine" / "model"  # an option that exists (so the CLI's pre-check passes it) but
    mine.mkdir(parents=True)  # whose defaults name a config that does not: it does not compose
    (mine / "broken.yaml").write_text("defaults:\n  - /nonexistent: nothing\nname: broken\n")
    command = [sys.executable, str(root / "launch.py"), "-m", "-cd", str(tmp_path / "mine")]
    command += [
        "model=tiny-llava,broken",
        "logger=none",
        f"results_dir={tmp_path}",
        "hydra.launcher.plan=true",
    ]
    planned = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert planned.returncode == 0, planned.stderr[-2000:]
    assert "2 jobs -> 1 cells: 1 new" in planned.stdout and "1 invalid jobs" in planned.stdout


def test_headline_numbers_have_one_format() -> None:
    from mmflow.sweep.record import headline_text

    text = headline_text({"min_rel_change_pct": -12.3456, "tiny": 1.2e-05, "layer": 3, "n": 8})
    assert text == "min_rel_change_pct=-12.346 tiny=0.000 layer=3 n=8"


def test_a_missing_mandatory_value_is_one_line_naming_its_key() -> None:
    """knockout=custom without a source: OmegaConf's three-line message becomes one line with the key."""
    from omegaconf import OmegaConf
    from omegaconf.errors import MissingMandatoryValue

    from mmflow.sweep.causes import config_error

    cfg = OmegaConf.create({"knockout": {"source": "???"}})
    with pytest.raises(MissingMandatoryValue) as caught:
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    line = config_error(caught.value)
    assert "\n" not in line and line.endswith("(knockout.source: set it, e.g. knockout.source=...)")
