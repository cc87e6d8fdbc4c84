"""The W&B workspace and report of a sweep (issue 26): specs built from offline sweeps, checked against
what the offline runs really logged (`wandb leet inspect --json`), artifacts read back, publishing
run up to the server (only `wandb.Api`, the client that talks to the server, is replaced)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import cell_config

from mmflow.sweep.core import CellJob, Sweep
from mmflow.sweep.settings import SweepSettings
from mmflow.wandb_logger import lineage
from mmflow.wandb_logger import publish as publishing
from mmflow.wandb_logger.publish import (
    PUBLISHED_FILE,
    REPORT_FILE,
    WORKSPACE_FILE,
    load_report,
    load_workspace,
)

WANDB = str(Path(sys.executable).parent / "wandb")
KNOCKOUTS = {"image_to_question": ("image", "question"), "question_to_last": ("question", "last")}
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def logger_section(root: Path) -> dict:
    return {"name": "wandb", "project": "mmflow-test", "mode": "offline", "dir": str(root), "curve_every": 0}


def run_sweep(tmp: Path, name: str, configs: list[dict]) -> dict:
    """Run `configs` as one sweep (in this process, W&B offline) as `mmflow run -m` would."""
    jobs = [CellJob.resolve(i, [], lambda c=c: c) for i, c in enumerate(configs)]
    assert [j.error or j.invalid for j in jobs] == [None] * len(jobs)
    settings = SweepSettings(executor="local", progress="none", report=False)
    sweep = Sweep(name, tmp / "sweep", jobs, settings, logger_cfg=logger_section(tmp / "wb"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WANDB_MODE", "offline")
        patch.setenv("WANDB_DATA_DIR", str(tmp / "wandb-data"))  # artifact staging, not ~/.local
        sweep.run()
    assert set(sweep.status.values()) == {"done"}, sweep.errors
    return {
        "tmp": tmp,
        "sweep_dir": tmp / "sweep",
        "runs": read_runs(tmp / "wb" / "wandb"),
        "ids": list(sweep.cells),
    }


def read_runs(folder: Path) -> dict[str, dict]:
    """Every offline run below `folder` by run id: its records, history keys and summary keys."""
    runs = {}
    for run_dir in sorted(folder.glob("offline-run-*")):
        out = subprocess.run(
            [WANDB, "leet", "inspect", "--json", str(run_dir)], capture_output=True, text=True
        )
        records = [json.loads(line) for line in out.stdout.splitlines() if line.strip()]
        history = [r["history"]["item"] for r in records if r["type"] == "history"]
        run_id = next(r["run"]["run_id"] for r in records if r["type"] == "run")
        summary_keys = {
            k.split(".")[0] for r in records if r["type"] == "summary" for k in r["summary"]["update"]
        }
        runs[run_id] = {
            "dir": run_dir,
            "history": history,
            "keys": {k for h in history for k in h} | summary_keys,
            "artifacts": [r["artifact"] for r in records if r["type"] == "artifact"],
        }
    return runs


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> dict:
    """experiment=smoke: tiny-llava and tiny-llava-next x 2 knockouts x windows 1, 3 (8 cells)."""
    tmp = tmp_path_factory.mktemp("smoke")
    configs = []
    for model in ("tiny-llava", "tiny-llava-next"):
        for knockout, (source, target) in KNOCKOUTS.items():
            for window in (1, 3):
                changes = {
                    "knockout": {"name": knockout, "source": source, "target": target},
                    "window": window,
                }
                configs.append(
                    cell_config(
                        tmp / "results",
                        model,
                        sweep_name="smoke",
                        engine={"name": "fast", "attention": "sdpa"},
                        logger=logger_section(tmp / "wb"),
                        **changes,
                    )
                )
    return run_sweep(tmp, "smoke", configs)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> dict:
    """Knockout, patching, answer tracking and a per-head knockout of tiny-llava in one sweep."""
    tmp = tmp_path_factory.mktemp("mixed")
    base = cell_config(
        tmp / "results",
        sweep_name="mixed",
        engine={"name": "fast", "attention": "sdpa"},
        logger=logger_section(tmp / "wb"),
        corruption="noise",
        patching={"groups": ["image", "last"], "noise_scale": 3.0, "margin": 0.0},
    )
    heads = {"name": "image_to_last", "source": "image", "target": "last", "heads": "each"}
    configs = [
        base,
        dict(base, analysis="patching"),
        dict(base, analysis="answer_tracking", lens="norm"),
        dict(base, knockout=heads),
    ]
    return run_sweep(tmp, "mixed", configs)


def outline(workspace) -> list[tuple[str, list[str]]]:
    return [
        (s.name, [getattr(p, "title", None) or p.chart_strings["title"] for p in s.panels])
        for s in workspace.sections
    ]


def panels_of(workspace, report) -> list:
    panels = [p for s in workspace.sections for p in s.panels]
    return panels + [p for b in report.blocks for p in (getattr(b, "panels", None) or [])]


@pytest.mark.slow  # the smoke sweep: 8 cells, ~40 s on a shared machine
def test_smoke_workspace_sections_and_panels(smoke: dict) -> None:
    workspace = load_workspace(smoke["sweep_dir"] / WORKSPACE_FILE)  # validated by wandb-workspaces' models
    titles = ["ChooseAttr — window 1", "ChooseAttr — window 3"]
    assert outline(workspace) == [
        ("Knockout: Image ↛ Question", titles),
        ("Knockout: Question ↛ Last", titles),
    ]
    sweep_runs = [r for r in smoke["runs"] if r.startswith("sweep-")]
    assert len(sweep_runs) == 1 and sorted(smoke["ids"]) == sorted(set(smoke["runs"]) - set(sweep_runs))
    assert workspace.runset_settings.filters == f'Metric("ID") in {smoke["ids"] + sweep_runs}'
    for panel in (p for s in workspace.sections for p in s.panels):
        assert panel.x.name == "rel_depth" and len(panel.y) == 2  # one line per model
        assert sorted(panel.line_titles.values()) == ["LLaVA-1.5 tiny", "LLaVA-NeXT (LLaMA-3) tiny"]
        colours = {title: panel.line_colors[series]["color"] for series, title in panel.line_titles.items()}
        assert colours == {"LLaVA-1.5 tiny": "#1f77b4", "LLaVA-NeXT (LLaMA-3) tiny": "#d62728"}  # by family
    first = workspace.sections[0].panels[0]
    assert [m.name for m in first.y] == [
        "flow/ChooseAttr/image_to_question/tiny-llava/w1/rel_change_pct",
        "flow/ChooseAttr/image_to_question/tiny-llava-next/w1/rel_change_pct",
    ]


@pytest.mark.slow  # the smoke sweep: 8 cells, ~40 s on a shared machine
def test_every_panel_names_a_key_its_runs_logged(smoke: dict, mixed: dict) -> None:
    for sweep in (smoke, mixed):
        workspace = load_workspace(sweep["sweep_dir"] / WORKSPACE_FILE)
        report = load_report(sweep["sweep_dir"] / REPORT_FILE)
        logged = {key for run in sweep["runs"].values() for key in run["keys"]}
        checked = 0
        for panel in panels_of(workspace, report):
            kind = type(panel).__name__
            if kind == "LinePlot":
                for series in panel.line_titles:  # "<run id>:<key>": the run really logged that key
                    run_id, key = series.split(":", 1)
                    assert {key, "rel_depth"} <= sweep["runs"][run_id]["keys"], series
                assert {m.name for m in panel.y} == {s.split(":", 1)[1] for s in panel.line_titles}
            elif kind == "CustomChart":
                assert panel.query["summaryTable"]["tableKey"] in logged
            elif kind == "MediaBrowser":
                assert set(panel.media_keys) <= logged and panel.media_keys
            else:
                raise AssertionError(f"unexpected panel {kind}")
            checked += 1
        assert checked >= 8


@pytest.mark.slow  # the smoke sweep: 8 cells, ~40 s on a shared machine
def test_facet_keys_carry_the_cells_curves(smoke: dict) -> None:
    cell_id = smoke["ids"][0]
    results = pd.read_parquet(smoke["tmp"] / "results" / cell_id / "results.parquet")
    history = [h for h in smoke["runs"][cell_id]["history"] if "rel_depth" in h]
    (key,) = [k for k in history[0] if k.startswith("flow/")]
    assert key == "flow/ChooseAttr/image_to_question/tiny-llava/w1/rel_change_pct"
    means = results.groupby("layer")["rel_change_pct"].mean()
    np.testing.assert_allclose([h[key] for h in history], means.to_numpy())
    np.testing.assert_allclose([h["rel_depth"] for h in history], means.index / 8)


def test_mixed_sweep_has_patching_beside_knockout_tracking_and_head_maps(mixed: dict) -> None:
    workspace = load_workspace(mixed["sweep_dir"] / WORKSPACE_FILE)
    assert outline(workspace) == [
        ("Knockout: Image ↛ Question", ["ChooseAttr — window 3"]),
        (
            "Patching beside knockout",
            ["tiny-llava — ChooseAttr: knockout", "tiny-llava — ChooseAttr: patching (corruption = noise)"],
        ),
        ("Answer tracking (logit lens)", ["tiny-llava — ChooseAttr"]),
        (
            "Head-resolved knockout maps",
            ["tiny-llava — ChooseAttr: Image ↛ Last (per head), relative change (%) per head"],
        ),
    ]
    patching = workspace.sections[1].panels[1]
    assert [m.name for m in patching.y] == [
        "flow/ChooseAttr/patching_noise/tiny-llava/w3/recovered_pct/image",
        "flow/ChooseAttr/patching_noise/tiny-llava/w3/recovered_pct/last",
    ]
    (chart,) = workspace.sections[3].panels
    assert chart.chart_name == "wandb/confusion_matrix/v1"
    assert chart.chart_fields == {"Actual": "layer", "Predicted": "head", "nPredictions": "rel_change_pct"}
    heads_run = next(
        r for r in mixed["runs"].values() if chart.query["summaryTable"]["tableKey"] in r["keys"]
    )
    assert not any(
        k.startswith("flow/") and k.endswith("/w3/rel_change_pct") and "heads=" not in k
        for k in heads_run["keys"]
    )  # the per-head cell never draws into the all-heads panels


def test_report_says_what_was_run_and_shows_the_paper_figures(mixed: dict) -> None:
    report = load_report(mixed["sweep_dir"] / REPORT_FILE)
    text = next(b.text for b in report.blocks if type(b).__name__ == "MarkdownBlock")
    data = json.loads((mixed["tmp"] / "results" / mixed["ids"][0] / "cell.json").read_text())["config"][
        "data"
    ]
    assert "**Command:**" in text and "**mmflow:** 0.1.0" in text and "commit `" in text
    assert (
        "| tiny-llava | tiny:tiny-llava | - | float32 | ChooseAttr | patching (corruption = noise) | shapes |"
        in text
    )
    assert "| fast | none (no paper-code differences) |" in text and data == {**data, "name": "shapes"}
    headings = [b.text for b in report.blocks if type(b).__name__ in ("H2", "H3")]
    assert (
        headings[:2] == ["What was run", "Knockout: Image ↛ Question"]
        and "Figures as in the paper" in headings
    )
    sweep_run = next(
        r for r in mixed["runs"].values() if r["dir"].name.split("-", 3)[-1].startswith("sweep-")
    )
    figures = [k for k in sweep_run["keys"] if k.startswith("paper_figure/")]
    assert len(figures) >= 3


def test_artifacts_name_their_inputs_and_hold_the_cells_files(mixed: dict) -> None:
    for cell_id in mixed["ids"]:
        (artifact,) = [a for a in mixed["runs"][cell_id]["artifacts"] if a["type"] == "cell-results"]
        assert artifact["name"] == f"cell-{cell_id}"
        files = {f["path"]: f for f in artifact["manifest"]["contents"]}
        assert sorted(files) == ["cell.json", "results.parquet", "samples.parquet"]
        staged = pd.read_parquet(files["results.parquet"]["local_path"])
        pd.testing.assert_frame_equal(
            staged, pd.read_parquet(mixed["tmp"] / "results" / cell_id / "results.parquet")
        )
        inputs = json.loads(artifact["metadata"])["inputs"]
        assert inputs["model"] == {
            "artifact": "model-tiny-tiny-llava",
            "checkpoint": "tiny:tiny-llava",
            "revision": None,
            "replica": True,
            "name": "tiny-llava",
            "family": "LLaVA-1.5",
            "dtype": "float32",
        }
        assert inputs["data"]["data"] == {"name": "shapes", "seed": 0}
        assert inputs["data"]["artifact"] == f"data-shapes-{inputs['data']['digest'][:16]}"
    (sweep_id,) = [r for r in mixed["runs"] if r.startswith("sweep-")]
    (figures,) = [a for a in mixed["runs"][sweep_id]["artifacts"] if a["type"] == "figures"]
    assert figures["name"] == f"figures-{sweep_id}"
    assert sorted(json.loads(figures["metadata"])["cells"]) == sorted(f"cell-{c}" for c in mixed["ids"])
    pngs = [f for f in figures["manifest"]["contents"] if f["path"].endswith(".png")]
    assert len(pngs) >= 3 and all(Path(f["local_path"]).read_bytes()[:4] == b"\x89PNG" for f in pngs)


def test_table_data_is_named_by_the_files_digest() -> None:
    from mmflow.wandb_logger.keys import data_input

    config = {"data": {"name": "table", "path": "/x/q.csv", "sha256": "ab" * 32, "format": "csv"}}
    described = data_input(config)
    assert described["artifact"] == "data-table-" + "ab" * 8 and described["digest_of"] == "file"
    assert data_input({"data": {**config["data"], "path": "/elsewhere/q.csv"}})["digest"] == "ab" * 32


@dataclass
class FakeArtifact:
    name: str


@dataclass
class FakeRun:
    server: FakeServer
    path: str

    def used_artifacts(self) -> list[FakeArtifact]:
        return [FakeArtifact(n) for n in self.server.used[self.path]]

    def use_artifact(self, artifact: FakeArtifact) -> None:
        self.server.requests.append(("useArtifact", {"run": self.path, "artifact": artifact.name}))
        self.server.used[self.path].append(artifact.name)


class FakeServer:
    """Stands in for `wandb.Api()` (the W&B server client): records the GraphQL requests it is sent."""

    def __init__(self, artifacts: set[str] | None = None) -> None:
        self.requests: list[tuple[str, dict]] = []
        self.views: dict[str, dict] = {}
        self.default_entity = "me"
        self._service_api = self  # wandb_workspaces._graphql sends requests through this
        self.artifacts = set(artifacts or ())  # "entity/project/name" that exist on the server
        self.used: dict[str, list[str]] = defaultdict(list)  # run path -> artifacts declared its inputs

    def artifact(self, path: str) -> FakeArtifact:
        from wandb.errors import CommError

        if path.removesuffix(":latest") not in self.artifacts:
            raise CommError(f"artifact {path} not found")
        return FakeArtifact(path.rsplit("/", 1)[-1].split(":")[0] + ":v0")  # as W&B names a version

    def run(self, path: str) -> FakeRun:
        return FakeRun(self, path)

    def __call__(self, *args, **kwargs) -> FakeServer:
        return self

    app_url = "https://wandb.example"

    def projects(self, entity: str) -> list:
        return []

    def create_project(self, name: str, entity: str) -> None:
        self.requests.append(("createProject", {"name": name, "entity": entity}))

    def execute_graphql(self, query: str, variables: dict | None = None) -> dict:
        variables = dict(variables or {})
        self.requests.append((query, variables))
        if "ProjectInternalId" in query:  # a report's run set asks for its project
            return {"project": {"id": "UHJvamVjdDox", "internalId": f"{variables['entityName']}-project"}}
        assert "upsertView" in query, query
        view_id = variables.get("id") or f"view{len(self.views)}"
        name = variables.get("name") or f"nw-{view_id}-v"
        self.views[view_id] = variables
        view = {"id": view_id, "name": name, "displayName": variables.get("displayName", "")}
        if variables.get("type") in ("runs", "runs/draft"):  # a report: the server returns the whole view
            view.update(
                spec=variables["spec"],
                description=variables.get("description", ""),
                project={"name": variables["projectName"], "entityName": variables["entityName"]},
            )
        return {"upsertView": {"view": view, "inserted": not variables.get("id")}}


def test_publish_creates_then_updates_the_same_workspace_and_report(mixed: dict, monkeypatch, capsys) -> None:
    import wandb

    prefix = "me/mmflow-test/"
    cells = [prefix + f"cell-{c}" for c in mixed["ids"]]
    server = FakeServer({*cells, prefix + "model-tiny-tiny-llava"})  # synced; the data never logged
    created = []

    def create_inputs(entity: str, project: str, items: list) -> None:  # an online run logging them
        created.extend((entity, project, item["artifact"]) for _, item in items)
        server.artifacts.update(f"{entity}/{project}/{item['artifact']}" for _, item in items)

    monkeypatch.setattr(lineage, "create_inputs", create_inputs)
    monkeypatch.setattr(wandb, "Api", server)
    sweep_dir = mixed["sweep_dir"]
    assert publishing.main(["publish", str(sweep_dir)]) == 0
    upserts = [v for q, v in server.requests if "upsertView" in q]
    assert [v["type"] for v in upserts] == ["project-view", "runs"] and "id" not in upserts[0]
    workspace_spec = json.loads((sweep_dir / WORKSPACE_FILE).read_text())["spec"]["spec"]
    sent = json.loads(upserts[0]["spec"])
    assert sent["section"]["panelBankConfig"] == workspace_spec["section"]["panelBankConfig"]
    assert upserts[0]["entityName"] == "me" and upserts[0]["projectName"] == "mmflow-test"
    report_spec = json.loads(upserts[1]["spec"])  # every run set is in the project, filtered to the sweep
    runsets = [r for b in report_spec["blocks"] for r in b.get("metadata", {}).get("runSets", [])]
    assert runsets and {r["project"]["name"] for r in runsets} == {"mmflow-test"}
    assert {r["project"]["entityName"] for r in runsets} == {"me"}
    record = json.loads((sweep_dir / PUBLISHED_FILE).read_text())
    assert record["workspace"]["url"].startswith("https://wandb.example/me/mmflow-test?nw=")
    assert record["report"]["url"].startswith("https://wandb.example/me/mmflow-test/reports/")
    assert record["report"]["url"] in capsys.readouterr().out

    # lineage: the missing data artifact created, then each cell run uses data and model, the sweep its cells
    (data_name,) = {
        i["data"]["artifact"]
        for i in json.loads((sweep_dir / WORKSPACE_FILE).read_text())["lineage"]["cells"].values()
    }
    assert created == [("me", "mmflow-test", data_name)]
    (sweep_id,) = [r for r in mixed["runs"] if r.startswith("sweep-")]
    assert sorted(record["lineage"]["added"][sweep_id]) == sorted(c.rsplit("/", 1)[-1] for c in cells)
    for cell in mixed["ids"]:
        assert server.used[prefix + cell] == [f"{data_name}:v0", "model-tiny-tiny-llava:v0"]

    server.requests.clear()
    assert publishing.main(["publish", str(sweep_dir)]) == 0  # again: the same views, updated
    again = [v for q, v in server.requests if "upsertView" in q]
    assert again[0]["id"] == record["workspace"]["id"] and again[1]["id"] == record["report"]["id"]
    assert not [q for q, _ in server.requests if q == "useArtifact"]  # nothing declared twice
    republished = json.loads((sweep_dir / PUBLISHED_FILE).read_text())
    assert republished["workspace"] == record["workspace"] and republished["report"] == record["report"]


def test_publish_without_specs_says_what_is_missing(tmp_path: Path, capsys) -> None:
    assert publishing.main(["publish", str(tmp_path)]) == 2
    assert f"{tmp_path / WORKSPACE_FILE} is missing" in capsys.readouterr().out


def test_online_sweep_publishes_at_its_end(mixed: dict, monkeypatch, tmp_path: Path) -> None:
    import wandb

    from mmflow.report.cells import load_cells
    from mmflow.wandb_logger.artifacts import inputs
    from mmflow.wandb_logger.sweep_run import _write_and_publish

    cells, _ = load_cells([mixed["tmp"] / "results" / c for c in mixed["ids"]])
    names = {i["artifact"] for c in cells for i in inputs(c.config).values()} | {
        f"cell-{c}" for c in mixed["ids"]
    }
    server = FakeServer({f"team/mmflow-test/{n}" for n in names})  # an online sweep logged them all

    def create_inputs(*args) -> None:
        raise AssertionError("all inputs exist: nothing to create")

    monkeypatch.setattr(lineage, "create_inputs", create_inputs)
    monkeypatch.setattr(wandb, "Api", server)
    cfg = {**logger_section(tmp_path), "entity": "team"}
    _write_and_publish(tmp_path, cells, cfg, "mixed", "sweep-x", {}, online=True)
    assert [v["entityName"] for q, v in server.requests if "upsertView" in q] == ["team", "team"]
    record = json.loads((tmp_path / PUBLISHED_FILE).read_text())
    assert record["entity"] == "team" and "error" not in record["lineage"], record["lineage"]


def test_missing_wandb_workspaces_is_a_clear_error(monkeypatch) -> None:
    from mmflow.wandb_logger import specs

    def missing(name: str):
        raise ImportError(f"No module named {name!r}")

    monkeypatch.setattr(specs.importlib, "import_module", missing)
    with pytest.raises(RuntimeError, match="pip install 'wandb-workspaces"):
        specs.import_workspaces()


def test_styles_follow_size_and_colours_family() -> None:
    from mmflow.wandb_logger.keys import colours, facet_key, styles

    configs = [
        {"model": {"name": n, "family": f, "size": s}}
        for n, f, s in [("a", "X", "7B"), ("b", "X", "13B"), ("c", "Y", "7B")]
    ]
    assert colours(configs) == {"X": "#1f77b4", "Y": "#d62728"}
    assert styles(configs) == {"13B": "solid", "7B": "dashed"}
    config = {
        "analysis": "knockout",
        "task": "T",
        "window": 3,
        "model": {"name": "llava-1.5-7b"},
        "knockout": {"name": "image_to_last", "source": "image", "target": "last"},
    }
    assert facet_key(config, "rel_change_pct") == "flow/T/image_to_last/llava-1_5-7b/w3/rel_change_pct"
