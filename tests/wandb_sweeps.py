"""Sweeps for the W&B dashboard tests: run in this process with W&B offline, runs read back."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import cell_config

from mmflow.sweep.core import CellJob, Sweep
from mmflow.sweep.settings import SweepSettings

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


def run_smoke(tmp_path_factory) -> dict:
    """The smoke sweep (`mmflow run -cn smoke`): tiny-llava and tiny-llava-next x 2 knockouts x
    windows 1, 3 (8 cells)."""
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


def run_mixed(tmp_path_factory) -> dict:
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
