"""Issue 23, item 4: labels, axes and checks use the loaded model's real depth; replicas and random
weights are marked in `cell.json`, W&B and the report.

A shrunk replica of llava-1.5-7b (2 random layers) appeared in the report as "LLaVA-1.5 7B (L = 32,
k = 7)", and `window=9` on it ran, its rows saying window 9 while the real window was 2.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from conftest import cell_config
from replica_helpers import loaded_replica

from mmflow.config.checks import window_for_depth
from mmflow.errors import CellConfigError
from mmflow.execution.runtime import run_cells
from mmflow.report.figures import plot_cross_model
from mmflow.storage.cell_data import load_cell

NOTE = "shrunk replica, 2 of 32 layers, random weights"


class FakeRun:
    def __init__(self) -> None:
        self.summary: dict = {}

    def log(self, payload) -> None:
        pass

    def finish(self, exit_code: int = 0) -> None:
        pass


@pytest.fixture(scope="module")
def replica():
    loaded = loaded_replica("llava-1.5-7b", "corrected")
    assert loaded.n_layers == 2 and loaded.weights["replica_of"] == "llava-hf/llava-1.5-7b-hf"
    return loaded


def _config(tmp_path: Path, loaded, **changes) -> dict:
    from replica_helpers import real_model_config

    config = cell_config(tmp_path, n_samples=1, **changes)
    config["model"] = {**real_model_config("llava-1.5-7b", "corrected"), "checkpoint": loaded.path}
    return config


def test_a_window_deeper_than_the_loaded_model_fails_the_cell(replica, tmp_path) -> None:
    outcome = run_cells(replica, [_config(tmp_path, replica, window=9)])[0]
    assert outcome.status == "failed"
    assert "window=9" in outcome.error and "has 2 decoder layers" in outcome.error
    assert "shrunk replica of llava-hf/llava-1.5-7b-hf" in outcome.error and "1..2" in outcome.error
    assert not (Path(outcome.path) / "results.parquet").exists()


def test_a_replica_is_labelled_with_its_real_depth_and_weights(replica, tmp_path, monkeypatch) -> None:
    from mmflow.wandb_logger import cell_run

    opened = {}

    def init_run(cfg, root, **kwargs):
        opened.update(kwargs)
        return FakeRun()

    monkeypatch.setattr(cell_run, "init_run", init_run)
    config = _config(tmp_path, replica, logger={"name": "wandb", "mode": "offline", "dir": str(tmp_path)})
    assert config["window"] == 3 and config["model"]["default_window"] == 7
    config["window"] = 7  # the model's default, chosen for 32 layers: runs with the replica's 2
    outcome = run_cells(replica, [config], logger_factory=cell_run.cell_logger)[0]
    assert outcome.status == "done", outcome.error
    meta = json.loads((Path(outcome.path) / "cell.json").read_text())
    info = meta["model_info"]
    assert (info["n_layers"], info["configured_n_layers"], info["weights"]) == (2, 32, "random")
    assert info["replica_of"] == "llava-hf/llava-1.5-7b-hf" and info["full_size"] is False
    assert meta["window_used"] == 2
    assert set(pd.read_parquet(Path(outcome.path) / "results.parquet")["window"]) == {2}
    # W&B: the run's config and tags say what ran
    assert opened["config"]["model_info"]["n_layers"] == 2 and opened["config"]["window_used"] == 2
    assert {"window=2", "shrunk-replica", "random-weights"} <= set(opened["tags"])
    assert "window=7" not in opened["tags"]
    # the report: axes on 2 layers, the weights in the legend and the title
    cell = load_cell(outcome.path)
    assert (cell.n_layers, cell.window) == (2, 2)
    assert cell.model_legend == f"LLaVA-1.5 7B [{NOTE}]"
    figure = plot_cross_model([cell])
    labels = [line.get_label() for line in figure.axes[0].get_lines() if not line.get_label().startswith("_")]
    assert labels == [f"LLaVA-1.5 7B [{NOTE}] (L = 2)"]
    title = cell.analysis.figure(cell).axes[0].get_title()
    assert title.startswith(f"llava-1.5-7b [{NOTE}] — ChooseAttr") and "k = 2" in title


def test_window_for_depth() -> None:
    shrunk = {"replica_of": "x/y", "full_size": False}
    config = {"window": 7, "model": {"default_window": 7}}
    assert window_for_depth(config, 32, None) == 7
    assert window_for_depth(config, 2, shrunk) == 2  # the default, on a shrunk replica
    for weights in (None, {"replica_of": "x/y", "full_size": True}):
        with pytest.raises(CellConfigError, match="has 2 decoder layers"):
            window_for_depth(config, 2, weights)
    with pytest.raises(CellConfigError, match="window=9"):
        window_for_depth({**config, "window": 9}, 2, shrunk)
