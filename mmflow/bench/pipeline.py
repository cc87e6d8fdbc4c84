"""Pipeline benchmark: a cell batch end to end (`run_cells`) vs one clean forward and the paper's algorithm.

`python -m mmflow.bench --pipeline --geometry llava-1.5|llava-next` builds the engine benchmark's
random-weight model (real sequence geometry, CPU-sized widths), writes noise JPEGs of the real sizes
for the first GQA-task rows, and times in one run, per sample:

- `pipeline_s_per_sample`: `run_cells` on one cell per knockout type (the paper's six by default), the
  code a sweep runs: load the task file, read + preprocess + encode + token groups (prefetched), one clean
  pass, the answer check from its cache, every knockout at every window, parquet part files and the
  final merge; wall clock of the whole call divided by the samples;
- `clean_forward_s`: one plain forward of the sample (vision tower + prefill, no cache), the floor;
- `paper_s_per_sample`: the paper's algorithm, per knockout type one baseline generation
  (`model.generate`, as the paper's code regenerates its answer for every block type) plus one full
  forward per window; `--reference-windows` window forwards per sample (spread over the types) are
  timed and scaled to all of them.

Each figure is the best of `--repeats` interleaved rounds. `stages` are seconds per sample per stage
of the best pipeline round (`prepare` runs in the prefetch thread, overlapped with the model;
`wait_for_prepare` is the time the model waited for it). The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mmflow.data.gqa import GQA_TASKS_DIR, read_task_csv
from mmflow.data.sample import Sample
from mmflow.execution.answer import generate_answer
from mmflow.execution.pipeline import Stages
from mmflow.execution.runtime import PREFETCH_DEPTH, load_samples, run_cells
from mmflow.inputs.encode import encode, load_image
from mmflow.knockout.cost import DecoderShape, floor_over_clean
from mmflow.knockout.reference import ReferenceEngine
from mmflow.knockout.spec import NAMED_KNOCKOUTS
from mmflow.models.registry import LoadedModel

PAPER_KNOCKOUTS = tuple(NAMED_KNOCKOUTS)  # the paper's six block types


def write_noise_images(task: str, n: int, folder: Path, seed: int = 0) -> list[Sample]:
    """Noise JPEGs at the CSV's sizes for the first `n` rows of a GQA task file (the real GQA questions)."""
    rows = read_task_csv(GQA_TASKS_DIR / f"{task}.csv", task, folder, check_images=False, limit=n)
    rng = np.random.default_rng(seed)
    for row in rows:
        if isinstance(row, Sample):
            width, height = row.image_size
            pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(row.image_path, quality=90)
    return [row for row in rows if isinstance(row, Sample)]


def cell_configs(loaded: LoadedModel, task: str, n: int, window: int, knockouts, image_dir: Path, out: Path):
    """One knockout cell config per type, sharing samples and clean passes (one `run_cells` batch)."""
    base = {
        "model": {"name": loaded.name, "checkpoint": loaded.path},
        "data": {"name": "gqa", "image_dir": str(image_dir)},
        "engine": {"name": "fast", "attention": "sdpa"},
        "task": task,
        "window": window,
        "n_samples": n,
        "seed": 0,
        "require_correct": False,  # random weights: knock out every sample, as a sweep of a real model would
        "max_new_tokens": 8,
        "analysis": "knockout",
        "results_dir": str(out),
        "logger": {"name": "none"},
    }
    return [
        {**base, "knockout": {"name": k, "source": NAMED_KNOCKOUTS[k][0], "target": NAMED_KNOCKOUTS[k][1]}}
        for k in knockouts
    ]


def _sync(loaded: LoadedModel) -> None:
    if loaded.device.type == "cuda":
        torch.cuda.synchronize(loaded.device)


def timed(loaded: LoadedModel, fn) -> tuple[float, object]:
    """(wall seconds, fn()) with the device synchronised on both ends."""
    _sync(loaded)
    start = time.perf_counter()
    out = fn()
    _sync(loaded)
    return time.perf_counter() - start, out


def paper_seconds(loaded, ref, inputs, jobs_by_knockout, reference_windows: int, max_new_tokens: int) -> dict:
    """The paper's algorithm for one sample: a generation per type plus a full forward per window.

    A window's forward costs the same whatever it blocks (the whole model, a different mask), so
    `reference_windows` forwards are timed, spread over the types and windows, and scaled to all.
    """
    generate_s, _ = timed(loaded, lambda: generate_answer(loaded, inputs, max_new_tokens))
    jobs = [job for type_jobs in jobs_by_knockout.values() for job in type_jobs]
    picks = np.unique(np.linspace(0, len(jobs) - 1, reference_windows).round().astype(int))
    seconds = [timed(loaded, lambda j=jobs[i]: ref.last_logprobs(inputs, j))[0] for i in picks]
    return {
        "generate_s": generate_s,
        "paper_s": generate_s * len(jobs_by_knockout) + float(np.mean(seconds)) * len(jobs),
    }


def sample_jobs(loaded, configs, samples) -> list[tuple]:
    """(inputs, {knockout: [job per centre]}) per sample, planned as the cells plan them."""
    from mmflow.analyses import make_analysis
    from mmflow.inputs.groups import build_token_groups

    analyses = {c["knockout"]["name"]: make_analysis(c, loaded) for c in configs}
    planned = []
    for sample in samples:
        inputs = encode(loaded, sample, load_image(sample))
        groups = build_token_groups(loaded, inputs, sample)
        planned.append((inputs, {name: a.plan(groups, sample).knockouts for name, a in analyses.items()}))
    return planned


def run_pipeline(
    loaded: LoadedModel,
    task: str = "QueryAttr",
    n_samples: int = 3,
    window: int = 7,
    knockouts=PAPER_KNOCKOUTS,
    repeats: int = 2,
    reference_windows: int = 3,
    prefetch_depth: int = PREFETCH_DEPTH,
    workdir: Path | None = None,
) -> dict:
    """Time the pipeline, the clean forward and the paper's algorithm on `loaded` (see the module doc)."""
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        tmp = Path(tmp)
        (tmp / "images").mkdir()
        samples = write_noise_images(task, n_samples, tmp / "images")
        window = min(window, loaded.n_layers)  # the paper's 7 of 32, at most the model's depth (dry runs)
        configs = cell_configs(loaded, task, n_samples, window, knockouts, tmp / "images", tmp / "r0")
        if len(samples) != len(load_samples(configs[0])):
            raise RuntimeError(f"the first {n_samples} rows of {task} are not all usable samples")
        ref = ReferenceEngine(loaded, "sdpa")
        planned = sample_jobs(loaded, configs, samples)
        ref.last_logprobs(planned[0][0], None)  # warm-up, not timed
        best: dict[str, float] = {}
        best_stages: Stages | None = None
        for round_ in range(repeats):
            clean = sum(timed(loaded, lambda i=i: ref.last_logprobs(i, None))[0] for i, _ in planned)
            best["clean"] = min(best.get("clean", clean), clean)
            stages = Stages()
            out = tmp / f"r{round_}"
            round_configs = [{**c, "results_dir": str(out)} for c in configs]
            seconds, outcomes = timed(
                loaded,
                lambda cs=round_configs, st=stages: run_cells(
                    loaded, cs, prefetch_depth=prefetch_depth, stages=st
                ),
            )
            failed = [o.error for o in outcomes if o.status != "done"]
            if failed:
                raise RuntimeError(f"pipeline cells failed: {failed[0]}")
            if seconds < best.get("pipeline", float("inf")):
                best["pipeline"], best_stages = seconds, stages
            paper = [
                paper_seconds(loaded, ref, i, jobs, reference_windows, configs[0]["max_new_tokens"])
                for i, jobs in planned
            ]
            for key in ("paper", "generate"):
                total = sum(p[f"{key}_s"] for p in paper)
                best[key] = min(best.get(key, total), total)
            scored = sum(o.summary.get("scored", 0) for o in outcomes)
        lengths = [i.length for i, _ in planned]
        shape = DecoderShape.of(loaded.model.config.get_text_config())
        floor = floor_over_clean(
            shape, [(i.length, [j for js in jobs.values() for j in js]) for i, jobs in planned]
        )
    summary = summarise(
        best, best_stages, len(samples), scored, lengths, knockouts, window, reference_windows
    )
    return {**summary, **floor_fields(floor, summary["pipeline_over_clean"])}


def floor_fields(floor: float, pipeline_over_clean: float) -> dict:
    """The least an exact engine could spend (mmflow.knockout.cost), next to what the pipeline spent."""
    return {
        "knockout_floor_over_clean": round(floor, 3),
        "pipeline_floor_over_clean": round(1 + floor, 3),
        "floor_is": "decoder MACs any exact knockout must recompute, + the clean pass; no answer check",
        "pipeline_over_floor": round(pipeline_over_clean / (1 + floor), 3),
    }


def summarise(best, stages, n, scored, lengths, knockouts, window, reference_windows) -> dict:
    per = {k: v / n for k, v in best.items()}
    answer = stages["answer"] / n
    return {
        "samples": n,
        "scored_cell_samples": scored,
        "sequence_lengths": lengths,
        "knockouts": list(knockouts),
        "window": window,
        "pipeline_s_per_sample": round(per["pipeline"], 4),
        "clean_forward_s": round(per["clean"], 4),
        "pipeline_over_clean": round(per["pipeline"] / per["clean"], 3),
        "paper_s_per_sample": round(per["paper"], 3),
        "speedup_vs_paper": round(per["paper"] / per["pipeline"], 2),
        "answer_s_per_sample": round(answer, 4),
        "answer_over_clean": round(answer / per["clean"], 3),
        "generate_s_per_sample": round(per["generate"], 4),
        "answer_speedup_vs_generate": round(per["generate"] / answer, 2) if answer else None,
        "stages": {name: round(seconds / n, 4) for name, seconds in sorted(stages.items())},
        "stages_are": "seconds per sample; prepare runs in the prefetch thread (overlapped)",
        "paper_forwards_timed_per_sample": reference_windows,
    }


def main(args: argparse.Namespace) -> dict:
    """`python -m mmflow.bench --pipeline ...` (arguments parsed by mmflow.bench.engine)."""
    from mmflow.bench.common import GEOMETRIES, build_loaded, model_summary

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    loaded = build_loaded(args.geometry, args.layers, args.hidden, args.heads)
    knockouts = (
        [k.strip() for k in args.knockouts.split(",") if k.strip()] if args.knockouts else PAPER_KNOCKOUTS
    )
    load_before = os.getloadavg()[0]
    result = run_pipeline(
        loaded,
        task=args.task,
        n_samples=args.samples,
        window=args.window,
        knockouts=knockouts,
        repeats=args.repeats,
        reference_windows=args.reference_windows,
        prefetch_depth=args.prefetch,
    )
    summary = {
        "benchmark": "pipeline",
        "geometry": args.geometry,
        "geometry_of": GEOMETRIES[args.geometry].like,
        **result,
        "prefetch_depth": args.prefetch,
        "model": model_summary(loaded, args),
        "timing": f"best of {args.repeats} interleaved rounds, wall clock",
        "torch_threads": torch.get_num_threads(),
        "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }
    print(json.dumps(summary), flush=True)
    return summary
