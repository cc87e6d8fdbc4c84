"""Issue 23, item 3: errors are not recorded as data.

A skip for the row's own content (missing or unreadable image, empty group, ...) is final. An exception
from code, config or environment (here: a processor config without `patch_size`, as in an older
checkpoint) is an error: the cell is never done with it, fails with the error when every sample failed
the same way, and the next run computes the errored samples again.
"""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
from conftest import cell_config

from mmflow.execution.runtime import run_cells
from mmflow.storage.store import CellStore
from mmflow.sweep.curve import status_line

pytestmark = pytest.mark.slow  # runs cells on a model per case: `make test`, not `make test-fast`


def _without_patch_size(loaded):
    processor = copy.copy(loaded.processor)
    processor.patch_size = None  # what an older processor config without the key loads as
    return replace(loaded, processor=processor)


class FailsOnCall:
    """The model's processor, raising on its `n`-th call (a fault of code, not of the row)."""

    def __init__(self, processor, n: int):
        self.processor, self.n, self.calls = processor, n, 0

    def __getattr__(self, name):
        return getattr(self.processor, name)

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.n:
            raise RuntimeError("processor exploded")
        return self.processor(*args, **kwargs)


def test_a_config_error_fails_the_cell_and_is_not_cached(tiny_llava, tmp_path) -> None:
    config = cell_config(tmp_path, n_samples=2)
    outcome = run_cells(_without_patch_size(tiny_llava), [config])[0]
    meta = json.loads((Path(outcome.path) / "cell.json").read_text())
    assert outcome.status == "failed" and meta["status"] == "failed"
    assert outcome.error.startswith("every sample (2) failed with TypeError: unsupported operand")
    assert not CellStore(tmp_path, config).is_done()
    parts = [pd.read_parquet(p) for p in (Path(outcome.path) / "parts").glob("samples-*.parquet")]
    assert sorted(p["status"][0] for p in parts) == ["errored", "errored"]  # recorded, as errors
    # the config fixed: the same cell is computed, not returned as cached
    again = run_cells(tiny_llava, [config])[0]
    assert again.status == "done", again.error
    meta = json.loads((Path(again.path) / "cell.json").read_text())
    assert meta["counts"]["scored"] == 2 and meta["counts"]["skipped"] == {}
    assert [r["ended"] for r in meta["runs"]] == ["failed", "done"]


def test_only_the_errored_samples_are_computed_again(tiny_llava, tmp_path) -> None:
    config = cell_config(tmp_path, n_samples=3)
    broken = replace(tiny_llava, processor=FailsOnCall(tiny_llava.processor, 2))
    outcome = run_cells(broken, [config], prefetch_depth=0)[0]
    assert outcome.status == "failed"
    assert outcome.error.startswith(
        "1 of 3 samples failed with an error (RuntimeError: processor exploded (x1))"
    )
    assert not CellStore(tmp_path, config).is_done()
    seen = []
    again = run_cells(tiny_llava, [config], on_sample=seen.append)[0]
    assert again.status == "done" and seen == [2, 1]  # two samples kept, the errored one computed
    samples = pd.read_parquet(Path(again.path) / "samples.parquet")
    assert samples["status"].tolist() == ["scored"] * 3


def test_a_content_skip_stays_final(tiny_llava, tmp_path) -> None:
    images = tmp_path / "images"  # empty: every image is missing, a fault of the rows
    images.mkdir()
    config = cell_config(tmp_path, data={"name": "gqa", "image_dir": str(images)}, task="QueryAttr")
    assert run_cells(tiny_llava, [config])[0].status == "done"
    assert run_cells(tiny_llava, [config])[0].status == "cached"


def test_a_cell_with_nothing_scored_says_why_in_its_status_line(tmp_path) -> None:
    counts = {"samples": 3, "scored": 0, "incorrect": 0, "skipped": {"missing_image": 3}}
    (tmp_path / "cell.json").write_text(json.dumps({"status": "done", "counts": counts, "config": {}}))
    assert status_line("abc", "cached", tmp_path) == (
        "[mmflow] cell abc: cached (no sample scored: skipped 3 of 3 samples: missing_image x3 "
        f"(see samples.parquet)) -> {tmp_path}"
    )
    counts.update(samples=0, skipped={})
    (tmp_path / "cell.json").write_text(json.dumps({"status": "done", "counts": counts, "config": {}}))
    assert "no sample for this cell" in status_line("abc", "done", tmp_path)
    counts.update(samples=3, scored=3)
    (tmp_path / "cell.json").write_text(json.dumps({"status": "done", "counts": counts, "config": {}}))
    assert status_line("abc", "done", tmp_path) == f"[mmflow] cell abc: done -> {tmp_path}"
