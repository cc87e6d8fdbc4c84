"""Publishing a sweep's W&B workspace and report (issue 26), run up to the server: only `wandb.Api`,
the client that talks to the W&B server, is replaced by a recorder that answers its requests."""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pytest
from wandb_sweeps import logger_section, run_mixed

from mmflow.wandb_logger import lineage
from mmflow.wandb_logger import publish as publishing
from mmflow.wandb_logger.publish import PUBLISHED_FILE, WORKSPACE_FILE

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> dict:
    return run_mixed(tmp_path_factory)


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

    from mmflow.storage.cell_data import load_cells
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
