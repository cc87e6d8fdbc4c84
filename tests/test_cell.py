"""One cell end to end: `python launch.py` for real, its files, resume, and bad input."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import ROOT, cell_config, model_config
from PIL import Image

from mmflow.execution.cell import SAMPLE_COLUMNS
from mmflow.execution.runtime import run_cells
from mmflow.storage.store import CellStore

RESULT_COLUMNS = {"question_id", "layer", "p_base", "p_new", "rel_change_pct", "logp_change", "top1_changed"}


def launch(*overrides: str, cwd: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "launch.py"), *overrides]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_launch_one_cell_writes_auditable_results(tmp_path):
    proc = launch(
        "model=tiny-llava",
        "knockout=question_to_last",
        "n_samples=3",
        f"results_dir={tmp_path}",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("[mmflow] cell"))
    cell_dir = Path(line.split("-> ")[1])
    meta = json.loads((cell_dir / "cell.json").read_text())
    assert meta["status"] == "done" and meta["cell_id"] == cell_dir.name
    assert meta["config"]["knockout"] == {"name": "question_to_last", "source": "question", "target": "last"}
    assert meta["counts"]["samples"] == 3 and meta["counts"]["scored"] == 3
    assert Path(meta["model_path"]).is_dir()

    samples = pd.read_parquet(cell_dir / "samples.parquet")
    results = pd.read_parquet(cell_dir / "results.parquet")
    assert set(SAMPLE_COLUMNS) <= set(samples.columns)
    assert RESULT_COLUMNS | {"model", "task", "knockout", "window"} <= set(results.columns)
    assert len(results) == 3 * 8 and not results.duplicated(["question_id", "layer"]).any()
    merged = results.merge(samples[["question_id", "p_base"]], on="question_id", suffixes=("", "_sample"))
    assert np.allclose(merged["p_base"], merged["p_base_sample"])
    assert np.allclose(
        results["rel_change_pct"], (results["p_new"] - results["p_base"]) / results["p_base"] * 100
    )
    assert np.allclose(
        results["logp_change"], np.log(results["p_new"]) - np.log(results["p_base"]), atol=1e-6
    )
    assert meta["headline"]["min_rel_change_pct"] == pytest.approx(
        results.groupby("layer")["rel_change_pct"].mean().min()
    )

    # prompt + image_path reproduce the model input and p_base with the model's own processor
    from mmflow.config.spec import ModelSpec
    from mmflow.models.registry import load_model
    from mmflow.models.synthetic.tiny import IMAGE_TOKEN

    loaded = load_model(ModelSpec.from_mapping(model_config("tiny-llava")))
    row = samples.iloc[0]
    image = Image.open(row["image_path"]).convert("RGB")
    enc = loaded.processor(text=row["prompt"], images=image, return_tensors="pt")
    groups = json.loads(row["groups"])
    assert int((enc["input_ids"][0] == loaded.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)).sum()) == len(
        groups["image"]
    )
    with torch.no_grad():
        logits = loaded.model(**enc).logits[0, -1]
    assert math.isclose(float(torch.softmax(logits, -1)[row["answer_token_id"]]), row["p_base"], rel_tol=1e-4)

    again = launch(
        "model=tiny-llava",
        "knockout=question_to_last",
        "n_samples=3",
        f"results_dir={tmp_path}",
        cwd=tmp_path,
    )
    assert again.returncode == 0 and f"{cell_dir.name}: cached" in again.stdout


def _config(tmp_path, **changes) -> dict:
    return cell_config(tmp_path, **{"n_samples": 4, "max_new_tokens": 4, **changes})


def test_interrupted_cell_resumes_without_recounting(tiny_llava, tmp_path):
    config = _config(tmp_path)
    seen = []

    def crash_after_two(n):
        seen.append(n)
        if len(seen) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_cells(tiny_llava, [config], on_sample=crash_after_two)
    store_dir = tmp_path / CellStore(tmp_path, config).id
    assert json.loads((store_dir / "cell.json").read_text())["status"] == "interrupted"  # recorded, issue 15
    assert len(list((store_dir / "parts").glob("samples-*.parquet"))) == 2
    before = {p.name: p.stat().st_mtime_ns for p in (store_dir / "parts").iterdir()}

    outcome = run_cells(tiny_llava, [config])[0]
    assert outcome.status == "done"
    results = pd.read_parquet(store_dir / "results.parquet")
    assert len(results) == 4 * 8 and not results.duplicated(["question_id", "layer"]).any()
    assert sorted(pd.read_parquet(store_dir / "samples.parquet")["order"]) == [0, 1, 2, 3]
    assert len(before) == 4  # two samples' parts were reused, not recomputed (parts are cleared at the end)


def test_bad_input_is_recorded_per_sample(tiny_llava, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    from mmflow.data.gqa import load_gqa

    rows = load_gqa("QueryAttr", images, n_samples=3)
    Image.new("RGB", rows[0].image_size if hasattr(rows[0], "image_size") else (10, 10)).save(
        images / "x.jpg"
    )
    config = _config(tmp_path, data={"name": "gqa", "image_dir": str(images)}, task="QueryAttr", n_samples=3)
    outcome = run_cells(tiny_llava, [config])[0]
    meta = json.loads((Path(outcome.path) / "cell.json").read_text())
    assert outcome.status == "done"
    assert meta["counts"]["skipped"] == {"missing_image": 3}
    samples = pd.read_parquet(Path(outcome.path) / "samples.parquet")
    assert samples["skip_reason"].tolist() == ["missing_image"] * 3
    assert all("jpg" in d for d in samples["skip_detail"])


def test_a_cell_with_unreadable_data_fails_alone(tiny_llava, tmp_path):
    good = _config(tmp_path, n_samples=2)
    bad = _config(tmp_path, data={"name": "gqa", "image_dir": str(tmp_path / "nope")}, n_samples=2)
    bad_out = run_cells(tiny_llava, [bad])[0]
    good_out = run_cells(tiny_llava, [good])[0]
    assert bad_out.status == "failed" and "image" in bad_out.error
    assert json.loads((Path(bad_out.path) / "cell.json").read_text())["status"] == "failed"
    assert good_out.status == "done"


def test_object_knockout_with_empty_group_is_a_per_sample_skip(tiny_llava, tmp_path):
    config = _config(
        tmp_path, knockout={"name": "true_option_to_last", "source": "true_option", "target": "last"}
    )
    config["task"] = "QueryAttr"  # no options in QueryAttr questions
    outcome = run_cells(tiny_llava, [config])[0]
    meta = json.loads((Path(outcome.path) / "cell.json").read_text())
    assert meta["counts"]["skipped"] == {"empty_group": 4} and meta["counts"]["scored"] == 0
