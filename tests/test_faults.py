"""Issue 15: faults users reported and fault injection found, one test per kind (in-process parts).

Each test reproduces the reported case through the public APIs (`run_cells`, the store, the data
readers, the W&B logger) and asserts the outcome a user now sees. Launch-level cases (concurrent
processes, sweeps) are in `test_faults_launch.py`.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import cell_config
from PIL import Image

from mmflow.data import DataError, Sample, Skip, read_table, resolve_data
from mmflow.data.gqa import read_task_csv, required_columns
from mmflow.execution.prepare import prepare_or_skip
from mmflow.execution.runtime import run_cells
from mmflow.storage.locks import sigterm_as_interrupt
from mmflow.storage.secrets import REDACTED, forwarded_env, redact, redact_yaml_file
from mmflow.storage.store import CellStore, cell_id
from mmflow.wandb_logger import cell_logger, sync_hint

QUESTIONS = [
    ("000000", "Is the jar full or empty?", "empty", "full"),
    ("000001", "What does <image> show, a cat or a dog?", "cat", "dog"),
    ("000002", "Is the cup red or blue?", "red", "blue"),
]


def write_table(folder: Path, rows=QUESTIONS, name: str = "vqa.csv", task: str | None = None) -> Path:
    """A user's ChooseAttr table (mmflow's column names) with one noise image per row."""
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    records = []
    for qid, question, true, false in rows:
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(images / f"img{qid}.jpg")
        record = {
            "question_id": qid,
            "image": f"img{qid}.jpg",
            "question": question,
            "answer": true,
            "true_option": true,
            "false_option": false,
            "image_w": 64,
            "image_h": 48,
            "objects": json.dumps([{"name": "jar", "box": [4, 4, 30, 30]}]),
        }
        if task:
            record["task"] = task
        records.append(record)
    path = folder / name
    pd.DataFrame(records).to_csv(path, index=False)
    return path


def table_config(folder: Path, table: Path, **changes) -> dict:
    data = {"name": "table", "path": str(table), "image_dir": str(table.parent / "images"), "columns": None}
    data = resolve_data(data)  # absolute paths and the file's digest, as `mmflow run` records them
    return cell_config(folder, data=data, n_samples=len(pd.read_csv(table)), **changes)


def meta_of(outcome) -> dict:
    return json.loads((Path(outcome.path) / "cell.json").read_text())


# ------------------------------------------------------------------ 1. text that breaks the processor


def test_text_that_breaks_the_processor_is_a_recorded_skip(tiny_llava, tmp_path):
    config = table_config(tmp_path, write_table(tmp_path))
    outcome = run_cells(tiny_llava, [config])[0]
    meta = meta_of(outcome)
    assert outcome.status == "done" and meta["status"] == "done"
    assert meta["counts"]["samples"] == 3 and meta["counts"]["scored"] == 2
    assert meta["counts"]["skipped"] == {"special_token_in_text": 1}
    samples = pd.read_parquet(Path(outcome.path) / "samples.parquet").set_index("question_id")
    assert "'<image>'" in samples.loc["000001", "skip_detail"]


def test_any_exception_while_preparing_a_sample_is_its_recorded_error(tiny_llava, tmp_path):
    """Not a skip for the row's content: an error (issue 23 item 3), which keeps the cell from done."""

    class BrokenProcessor:
        tokenizer = tiny_llava.processor.tokenizer
        image_token = "<image>"

        def __call__(self, **kwargs):
            raise IndexError("position 9 out of range")

    (sample,) = read_table(write_table(tmp_path, QUESTIONS[:1]), "ChooseAttr", tmp_path / "images")
    skip = prepare_or_skip(replace(tiny_llava, processor=BrokenProcessor()), sample)
    assert skip == Skip("000000", "sample_error", "IndexError: position 9 out of range", error=True)


# ------------------------------------------------------------------ 2. duplicate question ids


def test_duplicate_question_ids_are_a_data_error_naming_both_rows(tiny_llava, tmp_path):
    ids = ["000000", "000001", "000000", "000001"]  # two task files concatenated
    rows = [(qid, q, t, f) for qid, (_, q, t, f) in zip(ids, QUESTIONS + QUESTIONS[:1], strict=True)]
    table = write_table(tmp_path, rows)
    with pytest.raises(DataError, match=r"'000000'.*data row 1 .*data row 3"):
        read_table(table, "ChooseAttr", tmp_path / "images")
    outcome = run_cells(tiny_llava, [table_config(tmp_path, table)])[0]
    assert outcome.status == "failed" and "duplicate question_id '000000'" in outcome.error
    assert meta_of(outcome)["status"] == "failed"

    # two GQA task files concatenated: same rule in the GQA reader (shared code)
    header = list(required_columns("QueryAttr"))
    row = "{qid},img,What color is the cat?,black,64,48,cat,1,1,20,20\n"
    csv = tmp_path / "QueryAttr.csv"
    csv.write_text(",".join(header) + "\n" + "".join(row.format(qid=q) for q in ["000000", "000001"] * 2))
    with pytest.raises(DataError, match=r"duplicate question_id '000000'.*row 1 .*row 3"):
        read_task_csv(csv, "QueryAttr", tmp_path, check_images=False)


# ------------------------------------------------------------------ 7. damaged state on disk


def _interrupted_cell(tiny_llava, config, after: int = 2) -> Path:
    seen = []

    def stop(n):
        seen.append(n)
        if len(seen) == after:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_cells(tiny_llava, [config], on_sample=stop)
    return Path(config["results_dir"]) / cell_id(config)


@pytest.mark.slow
def test_damaged_state_never_counts_as_done(tiny_llava, tmp_path, caplog):
    config = cell_config(tmp_path, n_samples=3)
    cell = _interrupted_cell(tiny_llava, config)
    part = sorted((cell / "parts").glob("samples-*.parquet"))[0]
    part.write_bytes(part.read_bytes()[:40])  # a part truncated by a crash or a full disk
    outcome = run_cells(tiny_llava, [config])[0]
    assert outcome.status == "done" and meta_of(outcome)["counts"]["samples"] == 3
    moved = sorted(p.name.split(".")[0] for p in (cell / "damaged").iterdir())  # the sample's two parts
    assert moved == [part.stem.replace("samples-", "results-"), part.stem]
    assert pd.read_parquet(cell / "samples.parquet")["question_id"].is_unique

    results = cell / "results.parquet"
    results.write_bytes(results.read_bytes()[:100])  # truncated under an intact cell.json
    assert not CellStore(tmp_path, config).is_done()
    outcome = run_cells(tiny_llava, [config])[0]
    assert outcome.status == "done"  # computed again, not "cached"
    assert len(pd.read_parquet(results)) == 3 * 8

    (cell / "cell.json").write_text("{garbage")
    with caplog.at_level(logging.WARNING):
        outcome = run_cells(tiny_llava, [config])[0]
    assert outcome.status == "done" and meta_of(outcome)["status"] == "done"
    assert any(str(cell / "cell.json") in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------ 11. every ending recorded


def test_every_ending_is_recorded(tiny_llava, tmp_path):
    config = cell_config(tmp_path, n_samples=3)

    def disk_full(n):
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        run_cells(tiny_llava, [config], on_sample=disk_full)
    meta = json.loads((tmp_path / cell_id(config) / "cell.json").read_text())
    assert meta["status"] == "failed" and "No space left on device" in meta["error"]
    assert meta["runs"][-1]["ended"] == "failed" and meta["runs"][-1]["pid"] == os.getpid()

    with sigterm_as_interrupt(), pytest.raises(KeyboardInterrupt):  # `kill <pid>` of a run
        run_cells(tiny_llava, [config], on_sample=lambda n: os.kill(os.getpid(), signal.SIGTERM))
    meta = json.loads((tmp_path / cell_id(config) / "cell.json").read_text())
    assert meta["status"] == "interrupted" and "signal" in meta["error"]
    assert [r["ended"] for r in meta["runs"]] == ["failed", "interrupted"]


# ------------------------------------------------------------------ 10. secrets


def test_secrets_are_redacted_in_everything_mmflow_writes(tiny_llava, tmp_path):
    secret = "hf_S3cr3tValue"
    ray = {"runtime_env": {"env_vars": {"HF_TOKEN": secret, "HF_HOME": "/data/hf"}}, "forward_env": []}
    config = cell_config(tmp_path, n_samples=1, ray=ray)
    outcome = run_cells(tiny_llava, [config])[0]
    text = (Path(outcome.path) / "cell.json").read_text()
    assert secret not in text and "/data/hf" not in text and REDACTED in text
    assert outcome.cell_id == cell_id({**config, "ray": {}})  # where it ran is not part of the id

    saved = tmp_path / "overrides.yaml"  # what Hydra saves in .hydra/ and multirun.yaml
    saved.write_text(
        f"- model=tiny-llava\n- +ray.runtime_env.env_vars.HF_TOKEN={secret}\n- max_new_tokens=4\n"
    )
    assert redact_yaml_file(saved)
    assert saved.read_text().splitlines() == [
        "- model=tiny-llava",
        f"- +ray.runtime_env.env_vars.HF_TOKEN={REDACTED}",
        "- max_new_tokens=4",
    ]
    assert redact({"logger": {"WANDB_API_KEY": "k"}, "max_new_tokens": 8}) == {
        "logger": {"WANDB_API_KEY": REDACTED},
        "max_new_tokens": 8,
    }
    env = {"HF_TOKEN": secret, "MMFLOW_CACHE": "/c"}
    assert forwarded_env(["HF_TOKEN", "MMFLOW_CACHE", "HF_HOME"], env) == {"MMFLOW_CACHE": "/c"}


# ------------------------------------------------------------------ 4, 5. W&B


@pytest.mark.slow
def test_interrupted_cell_leaves_one_offline_run_to_upload(tiny_llava, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    logger = {"name": "wandb", "project": "mmflow-test", "mode": "offline", "curve_every": 0}
    ray = {"runtime_env": {"env_vars": {"HF_TOKEN": "hf_S3cr3tValue"}}}
    config = cell_config(tmp_path, n_samples=3, logger=logger, ray=ray)
    seen = []

    def stop(n):
        seen.append(n)
        if len(seen) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_cells(tiny_llava, [config], on_sample=stop, logger_factory=cell_logger)
    time.sleep(1.05 - time.time() % 1)  # offline run folders are named by the second they start in
    assert run_cells(tiny_llava, [config], logger_factory=cell_logger)[0].status == "done"

    hint = sync_hint(config)
    assert hint is not None and "wandb sync " in hint
    synced = Path(hint.split("wandb sync ", 1)[1].strip())
    # what `wandb sync <dir>` uploads: */*.wandb, the same file once (`latest-run` is a link)
    uploads = sorted({p.resolve().parent.name for p in synced.glob("*/*.wandb")})
    assert len(uploads) == 1 and uploads[0].endswith(cell_id(config))
    for path in tmp_path.rglob("*"):  # the runs' config is redacted like cell.json (item 10)
        assert not path.is_file() or b"hf_S3cr3tValue" not in path.read_bytes(), path
    assert len(list((tmp_path / "wandb-superseded").iterdir())) == 1  # kept, not uploaded


def test_wandb_dir_is_respected_and_logger_dir_wins(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    config = {"results_dir": str(tmp_path / "results"), "logger": {"name": "wandb", "mode": "offline"}}
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "envdir"))
    assert sync_hint(config).endswith(f"wandb sync {tmp_path / 'envdir' / 'wandb'}")
    config["logger"]["dir"] = str(tmp_path / "mine")
    assert sync_hint(config).endswith(f"wandb sync {tmp_path / 'mine' / 'wandb'}")
    monkeypatch.delenv("WANDB_DIR")
    del config["logger"]["dir"]
    assert sync_hint(config).endswith(f"wandb sync {tmp_path / 'results' / 'wandb'}")


# ------------------------------------------------------------------ data=table


def test_table_formats_column_map_and_task_per_row(tmp_path):
    csv = write_table(tmp_path, QUESTIONS[::2], task="ChooseAttr")
    frame = pd.read_csv(csv, dtype=str)
    other = frame.iloc[:1].assign(question_id="9", task="QueryAttr")
    frame = pd.concat([frame, other], ignore_index=True)
    renamed = frame.rename(columns={"question_id": "qid", "image": "file", "question": "text"})
    columns = {"qid": "question_id", "file": "image", "text": "question"}
    for name, write in (("t.jsonl", "to_json"), ("t.parquet", "to_parquet"), ("t.csv", "to_csv")):
        path = tmp_path / name
        kwargs = {"orient": "records", "lines": True} if write == "to_json" else {"index": False}
        getattr(renamed, write)(path, **kwargs)
        rows = read_table(path, "ChooseAttr", tmp_path / "images", columns=columns)
        assert [r.question_id for r in rows] == ["000000", "000002"]  # the QueryAttr row left out
        assert all(isinstance(r, Sample) for r in rows)
        assert rows[0].true_option == "empty" and rows[0].image_path == tmp_path / "images" / "img000000.jpg"


def test_table_rows_get_the_gqa_loaders_skips(tmp_path):
    table = write_table(tmp_path, QUESTIONS[:3])
    frame = pd.read_csv(table, dtype=str)
    frame.loc[0, "objects"] = json.dumps([{"name": "jar", "box": [40, 40, 60, 60]}])  # outside 64x48
    frame.loc[1, "image"] = "missing.jpg"
    frame.loc[2, "image_w"] = "65"
    frame.to_csv(table, index=False)
    rows = read_table(table, "ChooseAttr", tmp_path / "images")
    # a bad box is no bad sample (issue 13): only object-patch groups skip it, with the same reason
    assert isinstance(rows[0], Sample) and rows[0].box_issue[0] == "box_outside_image"
    assert [r.reason for r in rows[1:]] == ["missing_image", "image_size_mismatch"]
    frame.loc[1, "true_option"] = " "
    frame.to_csv(table, index=False)
    skip = read_table(table, "ChooseAttr", tmp_path / "images")[1]
    assert skip.reason == "malformed_row" and skip.detail.endswith("column 'true_option' is empty"), skip
    with pytest.raises(DataError, match="missing column.*answer"):
        frame.drop(columns="answer").to_csv(table, index=False)
        read_table(table, "ChooseAttr", tmp_path / "images")
