"""The line a single run prints about samples it did not score, and why."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mmflow.sweep.curve import print_unscored, unscored_line

ROOT = Path(__file__).resolve().parents[1]
TRIAL = {"missing_image": 1, "malformed_row": 1, "special_token_in_text": 1, "unreadable_image": 2}


def meta(scored: int, samples: int, skipped: dict | None = None, incorrect: int = 0, **config) -> dict:
    counts = {"samples": samples, "scored": scored, "skipped": skipped or {}, "incorrect": incorrect}
    return {"counts": counts, "config": {"require_correct": True, **config}}


def test_every_sample_scored_prints_nothing(tmp_path, capsys) -> None:
    assert unscored_line(meta(8, 8)) is None
    (tmp_path / "cell.json").write_text(json.dumps(meta(8, 8)))
    assert print_unscored(tmp_path) is None and capsys.readouterr().out == ""


def test_skips_are_counted_by_reason_most_first(tmp_path, capsys) -> None:
    expected = (
        "skipped 5 of 8 samples: unreadable_image x2, malformed_row x1, missing_image x1, "
        "special_token_in_text x1 (see samples.parquet)"
    )
    assert unscored_line(meta(3, 8, TRIAL)) == expected
    (tmp_path / "cell.json").write_text(json.dumps(meta(3, 8, TRIAL)))
    print_unscored(tmp_path)
    assert capsys.readouterr().out == f"[mmflow] {expected}\n"


def test_incorrect_answers_are_named_with_the_setting_that_dropped_them() -> None:
    assert unscored_line(meta(4, 8, incorrect=4)) == (
        "4 of 8 samples answered incorrectly (require_correct=true) (see samples.parquet)"
    )
    assert unscored_line(meta(1, 8, {"missing_image": 3}, incorrect=4)) == (
        "skipped 3 of 8 samples: missing_image x3; 4 answered incorrectly (require_correct=true) "
        "(see samples.parquet)"
    )


def test_nothing_scored_says_so_and_why() -> None:
    assert unscored_line(meta(0, 5, TRIAL)) == (
        "no sample scored: skipped 5 of 5 samples: unreadable_image x2, malformed_row x1, missing_image x1, "
        "special_token_in_text x1 (see samples.parquet)"
    )


@pytest.mark.slow
def test_a_single_run_prints_why_its_samples_were_skipped(tmp_path) -> None:
    images = tmp_path / "images"  # empty: every GQA image is missing
    images.mkdir()
    overrides = ["model=tiny-llava", "data=gqa", f"data.image_dir={images}", "task=QueryAttr", "n_samples=3"]
    cmd = [
        sys.executable,
        str(ROOT / "launch.py"),
        *overrides,
        "logger=none",
        f"results_dir={tmp_path / 'r'}",
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    status = next(i for i, x in enumerate(lines) if x.startswith("[mmflow] cell"))
    why = "no sample scored: skipped 3 of 3 samples: missing_image x3 (see samples.parquet)"
    assert lines[status].endswith(f": done ({why}) -> {tmp_path / 'r' / lines[status].split()[2][:-1]}")
    assert lines[status + 1].startswith("[mmflow] no scored samples in "), proc.stdout[-3000:]
