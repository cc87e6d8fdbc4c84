"""The prefetching pipeline: same rows as without it, failures in the queue are skips, resumes skip ahead."""

from __future__ import annotations

import threading
import time

import pandas as pd
import pytest
from conftest import cell_config

from mmflow.execution import prepare, runtime
from mmflow.execution.pipeline import Stages, prefetch
from mmflow.execution.runtime import run_cells
from mmflow.storage.store import CellStore


def test_prefetch_keeps_order_bounds_the_queue_and_hands_over_errors():
    started: list[int] = []
    consumer_at = [-1]
    ahead = []

    def prepare(i: int) -> int:
        started.append(i)
        ahead.append(i - consumer_at[0])
        time.sleep(0.002)
        if i == 3:
            raise OSError(f"bad {i}")
        return i * 10

    out = []
    for i, future in prefetch(range(8), prepare, depth=2):
        consumer_at[0] = i
        try:
            out.append(future.result())
        except OSError as exc:
            out.append(str(exc))
    assert out == [0, 10, 20, "bad 3", 40, 50, 60, 70]
    assert started == list(range(8))
    assert max(ahead) <= 3  # submitted while item i is consumed: at most i+1..i+2 ahead (+ the one before)
    threads_before = threading.active_count()
    for i, _ in prefetch(range(100), prepare, depth=3):
        if i == 1:
            break
    assert threading.active_count() <= threads_before
    assert len(started) <= 8 + 2 + 3 + 1  # leaving early does not prepare the rest
    assert [f.result() for _, f in prefetch([1, 2], lambda i: i + 1, depth=0)] == [2, 3]
    with pytest.raises(ValueError):
        list(prefetch([1], prepare, depth=-1))


def _frames(outcome) -> tuple[pd.DataFrame, pd.DataFrame]:
    return tuple(pd.read_parquet(f"{outcome.path}/{name}.parquet") for name in ("samples", "results"))


@pytest.mark.slow
def test_prefetched_cells_same_rows_and_a_failing_sample_is_a_skip(tiny_llava, tmp_path, monkeypatch):
    load_image = prepare.load_image  # samples are read in mmflow.execution.prepare (issue 15)

    def flaky(sample):
        if sample.question_id == bad_id:
            raise OSError("truncated JPEG")
        return load_image(sample)

    monkeypatch.setattr(prepare, "load_image", flaky)
    outcomes = {}
    for depth in (0, 2):
        folder = tmp_path / f"depth{depth}"
        configs = [
            cell_config(folder, n_samples=4, engine={"name": "fast", "attention": "sdpa"}, knockout=k)
            for k in (
                {"name": "image_to_question", "source": "image", "target": "question"},
                {"name": "question_to_last", "source": "question", "target": "last"},
            )
        ]
        if depth == 0:
            bad_id = runtime.load_samples(configs[0])[1].question_id
        stages = Stages()
        outcomes[depth] = run_cells(tiny_llava, configs, prefetch_depth=depth, stages=stages)
        assert all(o.status == "done" for o in outcomes[depth])
        assert {"prepare", "clean_pass", "answer", "knockouts", "rows_and_writes"} <= set(stages)
    for plain, ahead in zip(outcomes[0], outcomes[2], strict=True):
        samples, results = _frames(plain)
        samples_ahead, results_ahead = _frames(ahead)
        drop = ["image_path"]
        pd.testing.assert_frame_equal(samples.drop(columns=drop), samples_ahead.drop(columns=drop))
        pd.testing.assert_frame_equal(results, results_ahead)
        skipped = samples_ahead.set_index("question_id").loc[bad_id]
        assert (skipped["status"], skipped["skip_reason"]) == ("skipped", "unreadable_image")
        assert "truncated JPEG" in skipped["skip_detail"]
        assert (samples_ahead["status"] == "scored").sum() == 3 and len(results_ahead) > 0


def test_resumed_cell_does_not_prepare_samples_it_has(tiny_llava, tmp_path, monkeypatch):
    config = cell_config(tmp_path, n_samples=4, engine={"name": "fast", "attention": "sdpa"})
    prepared: list[str] = []
    prepare = runtime.prepare_sample

    def spy(loaded, sample, stages, **limits):
        prepared.append(sample.question_id)
        return prepare(loaded, sample, stages, **limits)

    monkeypatch.setattr(runtime, "prepare_sample", spy)

    class Stop(Exception):
        pass

    seen = []

    def stop_after_two(n):
        seen.append(n)
        if sum(seen) == 2:
            raise Stop

    with pytest.raises(Stop):
        run_cells(tiny_llava, [config], on_sample=stop_after_two, prefetch_depth=1)
    ids = [s.question_id for s in runtime.load_samples(config)]
    have = CellStore(config["results_dir"], config).done_question_ids()
    assert have == set(ids[:2])
    prepared.clear()
    outcome = run_cells(tiny_llava, [config], prefetch_depth=2)[0]
    assert outcome.status == "done" and prepared == ids[2:]
    samples, _ = _frames(outcome)
    assert samples["question_id"].tolist() == ids
