"""Benchmark: the reference engine vs the fast engine vs one clean forward, at the real sequence geometry.

`python -m mmflow.bench --geometry llava-1.5|llava-next` builds a random-weight model with the real
geometry (32 Llama layers, 576 image tokens per view, LLaVA-NeXT anyres for a 500x375 image, the
paper's prompt and real GQA questions) but small widths so it runs on a CPU, then times, per sample:

- `clean_forward_s`: one plain clean forward of the sample (vision tower + prefill, no cache kept),
  the floor nothing can beat;
- `fast_s`: the fast engine's own clean pass (vision tower, prefill keeping K/V and layer inputs)
  plus every knockout of the sample (all knockout types x all centre layers);
- `reference_s`: the paper's algorithm, one full forward per window per type. Every window costs the
  same, so `--reference-windows` windows per type are timed and scaled to all of them.

Each is the best of `--repeats` interleaved rounds (the machine may be shared), in wall-clock seconds
and, under `process_cpu_time`, in CPU seconds of this process. Memory (skip with `--no-memory`) is
the peak of torch's CPU allocator above its level before the call (model weights and inputs
excluded), from torch.profiler's allocation events, for the reference clean pass and for the fast
engine (its clean pass plus the run, caches included). The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os

import numpy as np
import torch

from mmflow.bench.common import (
    GEOMETRIES,
    Best,
    build_loaded,
    gqa_samples,
    model_summary,
    noise_image,
    peak_bytes,
    ratios,
)
from mmflow.data.sample import Sample
from mmflow.inputs.encode import ModelInputs, encode
from mmflow.inputs.groups import build_token_groups
from mmflow.knockout.cost import DecoderShape, floor_over_clean
from mmflow.knockout.fast import make_fast_engine
from mmflow.knockout.reference import ReferenceEngine
from mmflow.knockout.spec import NAMED_KNOCKOUTS, BlockEdges, KnockoutJob, window_layers
from mmflow.models.registry import LoadedModel

MAIN_KNOCKOUTS = ("image_to_question", "image_to_last", "question_to_last", "last_to_last")
# `--analysis` -> the module whose `main(args, loaded)` benchmarks it (imported only when chosen).
ANALYSIS_BENCHES = {
    "knockout": "mmflow.bench.engine",
    "patching": "mmflow.bench.patching",
    "attribution": "mmflow.bench.attribution",
}
# An analysis benchmark's own defaults (the attribution screen: the 32 x 32 grid, Image -> Question).
BENCH_DEFAULTS = {"attribution": {"heads": 32, "knockouts": "image_to_question"}}


def plan_jobs(loaded: LoadedModel, inputs: ModelInputs, sample: Sample, knockouts, window: int):
    """{knockout: [job per centre layer]} for one sample, and its token groups."""
    groups = build_token_groups(loaded, inputs, sample)
    plan = {}
    for name in knockouts:
        source, target = NAMED_KNOCKOUTS[name]
        edges = BlockEdges(groups.require(source), groups.require(target))
        layers = range(loaded.n_layers)
        plan[name] = [KnockoutJob(edges, window_layers(c, window, loaded.n_layers)) for c in layers]
    return plan, groups


def run_sample(ref, fast, inputs, plan, reference_windows: int, repeats: int) -> dict:
    """Time one sample three ways (best of `repeats` interleaved rounds); compare reference and fast."""
    jobs = [job for type_jobs in plan.values() for job in type_jobs]
    first_target = min(job.edges.first_target for job in jobs)
    ref_clean = ref.clean(inputs)
    timed_windows, offset = {}, 0  # (knockout, centre) -> index of the job in `jobs`
    for name, type_jobs in plan.items():
        centres = np.unique(np.linspace(0, len(type_jobs) - 1, reference_windows).round().astype(int))
        timed_windows.update({(name, int(c)): offset + int(c) for c in centres})
        offset += len(type_jobs)
    best, diff = Best(), 0.0
    for _ in range(repeats):
        best.time("clean_forward", lambda: ref.last_logprobs(inputs, None))
        fast_out, _ = best.time("fast", lambda: _fast(fast, inputs, first_target, jobs))
        for key, index in timed_windows.items():
            out = best.time(key, lambda i=index: ref.run(ref_clean, [jobs[i]]))
            diff = max(diff, float((out[0].exp() - fast_out[index].exp()).abs().max()))
    result = dict(reference_forwards_timed=len(timed_windows) * repeats, max_abs_diff_p=diff)
    for kind, seconds in (("", best.wall), ("_cpu", best.cpu)):
        reference = 0.0
        for name, type_jobs in plan.items():  # every window is one full forward: mean x windows
            reference += float(np.mean([seconds[key] for key in timed_windows if key[0] == name])) * len(
                type_jobs
            )
        result[f"reference{kind}_s"] = reference
        result[f"fast{kind}_s"] = seconds["fast"]
        result[f"clean_forward{kind}_s"] = seconds["clean_forward"]
    return result


def _fast(fast, inputs, first_target, jobs):
    clean = fast.clean(inputs, first_target=first_target)
    return fast.run(clean, jobs), clean


def measure_memory(ref, fast, inputs, jobs) -> dict:
    """Peak torch CPU memory (MiB) of the reference clean pass and of the fast engine, above weights."""
    first_target = min(job.edges.first_target for job in jobs)
    clean = peak_bytes(lambda: ref.last_logprobs(inputs, None))
    fast_peak = peak_bytes(lambda: _fast(fast, inputs, first_target, jobs))
    weights = sum(p.numel() * p.element_size() for p in ref.loaded.model.parameters())
    mib = 1 << 20
    return dict(
        method="torch.profiler CPU allocator events: peak above the level before the call (weights excluded)",
        weights_mib=round(weights / mib, 1),
        clean_peak_mib=round(clean / mib, 1),
        fast_peak_mib=round(fast_peak / mib, 1),
        fast_over_clean_peak=round(fast_peak / clean, 3),
        fast_over_clean_peak_with_weights=round((fast_peak + weights) / (clean + weights), 3),
        kv_cache_mib=round(kv_cache_bytes(ref.loaded, inputs.length) / mib, 1),
    )


def kv_cache_bytes(loaded: LoadedModel, length: int) -> int:
    """Bytes of the fast engine's per-layer keys and values for a sequence of `length` tokens."""
    text = loaded.model.config.get_text_config()
    head_dim = text.hidden_size // text.num_attention_heads
    itemsize = torch.finfo(loaded.model.dtype).bits // 8
    return 2 * text.num_hidden_layers * length * text.num_key_value_heads * head_dim * itemsize


def profile_fast(fast, inputs, jobs, rows: int = 12) -> str:
    """The fast engine's most expensive ops (self CPU time), to see what dominates."""
    from torch.profiler import ProfilerActivity, profile

    first_target = min(job.edges.first_target for job in jobs)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        _fast(fast, inputs, first_target, jobs)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m mmflow.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--geometry", choices=sorted(GEOMETRIES), default="llava-1.5")
    parser.add_argument("--pipeline", action="store_true", help="time run_cells end to end (bench_pipeline)")
    parser.add_argument("--samples", type=int, default=None, help="default 2 (engine), 3 (pipeline)")
    parser.add_argument(
        "--analysis",
        choices=tuple(ANALYSIS_BENCHES),
        default="knockout",
        help="patching: mmflow.bench.patching; attribution: mmflow.bench.attribution",
    )
    parser.add_argument("--window", type=int, default=7)
    parser.add_argument(
        "--knockouts",
        default=None,
        help="comma-separated names; default the four main (engine), all six (pipeline)",
    )
    parser.add_argument("--task", default="QueryAttr", help="GQA task file the questions come from")
    parser.add_argument(
        "--reference-windows",
        type=int,
        default=None,
        help="reference forwards timed: per knockout type (engine, default 2), per sample (pipeline, 3)",
    )
    parser.add_argument(
        "--repeats", type=int, default=None, help="interleaved rounds, best kept; default 3 / 2"
    )
    parser.add_argument("--prefetch", type=int, default=2, help="pipeline: samples prepared ahead (0: none)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=None, help="default 8 (32 for attribution)")
    parser.add_argument("--top-k", type=int, default=5, help="attribution: estimates verified (and controls)")
    parser.add_argument("--toy-samples", type=int, default=4, help="attribution: toy-llava samples")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory measurement")
    parser.add_argument("--profile", action="store_true", help="print the fast engine's top ops")
    args = parser.parse_args(argv)
    pipeline = args.pipeline
    args.samples = args.samples if args.samples is not None else (3 if pipeline else 2)
    args.repeats = args.repeats if args.repeats is not None else (2 if pipeline else 3)
    args.reference_windows = args.reference_windows or (3 if pipeline else 2)
    defaults = {"heads": 8, "knockouts": ",".join(MAIN_KNOCKOUTS), **BENCH_DEFAULTS.get(args.analysis, {})}
    args.heads = args.heads or defaults["heads"]
    if args.knockouts is None and not pipeline:
        args.knockouts = defaults["knockouts"]
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.pipeline:
        from mmflow.bench.pipeline import main as pipeline_main

        return pipeline_main(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    knockouts = [k.strip() for k in args.knockouts.split(",") if k.strip()]
    torch.manual_seed(0)
    loaded = build_loaded(args.geometry, args.layers, args.hidden, args.heads)
    module = ANALYSIS_BENCHES[args.analysis]
    if module != "mmflow.bench.engine":  # another analysis's benchmark, in its own module
        return importlib.import_module(module).main(args, loaded)
    ref, fast = ReferenceEngine(loaded, "sdpa"), make_fast_engine(loaded, "sdpa")
    load_before = os.getloadavg()[0]
    totals: dict[str, float] = {}
    shapes: dict[str, list[int]] = {"sequence_lengths": [], "image_tokens": [], "question_to_end_tokens": []}
    memory, planned = None, []
    text_config = loaded.model.config.get_text_config()
    for index, sample in enumerate(gqa_samples(args.task, args.samples)):
        inputs = encode(loaded, sample, noise_image(index))
        plan, groups = plan_jobs(loaded, inputs, sample, knockouts, args.window)
        if index == 0:
            ref.clean(inputs)  # warm-up (allocator, thread pools), not timed
        result = run_sample(ref, fast, inputs, plan, args.reference_windows, args.repeats)
        print(json.dumps({"sample": sample.question_id, "length": inputs.length, **result}), flush=True)
        for key, value in result.items():
            totals[key] = (
                max(totals.get(key, 0), value) if key == "max_abs_diff_p" else totals.get(key, 0) + value
            )
        shapes["sequence_lengths"].append(inputs.length)
        shapes["image_tokens"].append(int(groups.image.numel()))
        shapes["question_to_end_tokens"].append(inputs.length - int(groups.question.min()))
        jobs = [job for type_jobs in plan.values() for job in type_jobs]
        planned.append((inputs.length, jobs))
        if index == 0 and not args.no_memory:
            memory = measure_memory(ref, fast, inputs, jobs)
        if index == 0 and args.profile:
            print(profile_fast(fast, inputs, jobs), flush=True)
    summary = {
        "geometry": args.geometry,
        "geometry_of": GEOMETRIES[args.geometry].like,
        "samples": len(shapes["sequence_lengths"]),
        **shapes,
        "model": model_summary(loaded, args),
        "knockouts": knockouts,
        "window": args.window,
        "jobs_per_sample": len(knockouts) * args.layers,
        "engine": fast.name,
        **ratios(totals, ""),
        "fast_floor_over_clean": round(1 + floor_over_clean(DecoderShape.of(text_config), planned), 3),
        "fast_floor_is": "decoder MACs any exact knockout engine must spend, its clean pass included",
        "reference_windows_timed_per_knockout": args.reference_windows,
        "reference_forwards_timed": int(totals["reference_forwards_timed"]),
        "timing": f"best of {args.repeats} interleaved rounds per sample, summed over samples",
        "fast_s_includes": "the fast engine's own clean pass (vision tower, prefill keeping K/V) + all jobs",
        "clean_forward_s_is": "one plain forward of the sample (no cache), vision tower included",
        "max_abs_diff_p": totals["max_abs_diff_p"],
        "max_abs_diff_p_over": "every vocabulary entry of every timed reference window",
        "process_cpu_time": ratios(totals, "_cpu"),
        "memory": memory,
        "torch_threads": torch.get_num_threads(),
        "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }
    print(json.dumps(summary), flush=True)
    return summary
