"""`python -m mmflow.bench --analysis patching`: the fast patcher vs one full forward per job.

Per sample (noise corruption, restored groups image, question, last, every centre layer):
- `reference_s`: the plain way: the clean states (one forward), the corrupted run (one forward) and
  one full forward of the corrupted run per centre layer per group, states substituted by hooks.
  `--reference-windows` windows per group are timed and scaled to all L of them.
- `fast_s`: the fast patcher: the clean pass keeping layer inputs, the corrupted pass keeping K/V
  and layer inputs, then every job restarted from the cached corrupted run, batched.
- `clean_forward_s`: one clean forward (the floor).
Best of `--repeats` interleaved rounds, like the knockout benchmark; the last line is one JSON object.
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch

from mmflow.inputs.encode import encode
from mmflow.inputs.groups import build_token_groups
from mmflow.knockout.reference import ReferenceEngine
from mmflow.knockout.spec import window_layers
from mmflow.patching.corrupt import image_embeddings, make_corruption
from mmflow.patching.restore import CleanStates, FastPatcher, ReferencePatcher, RestoreJob

GROUPS = ("image", "question", "last")


def _fast(patcher: FastPatcher, inputs, corruption, first_target: int, jobs):
    states = patcher.clean_states(patcher.clean(inputs, first_target=first_target), first_target)
    return patcher.restore(patcher.corrupted(corruption, first_target), states, jobs)


def _reference_setup(patcher: ReferencePatcher, inputs, corruption, first_target: int):
    return CleanStates(patcher.states(inputs, first_target), first_target), patcher.corrupted(
        corruption, first_target
    )


def run_sample(loaded, inputs, sample, window: int, reference_windows: int, repeats: int) -> dict:
    """Time one sample both ways (best of `repeats` rounds) and compare the timed windows."""
    from mmflow.bench.common import Best

    groups = build_token_groups(loaded, inputs, sample)
    n_layers = loaded.n_layers
    sd = float(image_embeddings(loaded, inputs, groups.image).std())
    corruption = make_corruption(loaded, "noise", sample, inputs, groups.image, sd=sd)
    positions = {name: groups.require(name) for name in GROUPS}
    jobs = [
        RestoreJob(positions[g], window_layers(c, window, n_layers)) for g in GROUPS for c in range(n_layers)
    ]
    first_target = min(int(p.min()) for p in positions.values())
    centres = np.unique(np.linspace(0, n_layers - 1, reference_windows).round().astype(int))
    timed = [GROUPS.index(g) * n_layers + int(c) for g in GROUPS for c in centres]
    reference, fast = ReferencePatcher(loaded, "sdpa"), FastPatcher(loaded, "sdpa")
    clean_engine = ReferenceEngine(loaded, "sdpa")
    best, diff = Best(), 0.0
    for _ in range(repeats):
        best.time("clean_forward", lambda: clean_engine.clean(inputs))
        fast_out = best.time("fast", lambda: _fast(fast, inputs, corruption, first_target, jobs))
        states, corrupted = best.time(
            "setup", lambda: _reference_setup(reference, inputs, corruption, first_target)
        )
        for index in timed:
            out = best.time(index, lambda i=index, c=corrupted, s=states: reference.restore(c, s, [jobs[i]]))
            diff = max(diff, float((out[0].exp() - fast_out[index].exp()).abs().max()))
    result = {"reference_forwards_timed": len(timed) * repeats, "max_abs_diff_p": diff}
    for kind, seconds in (("", best.wall), ("_cpu", best.cpu)):
        per_group = [np.mean([seconds[i] for i in timed if i // n_layers == g]) for g in range(len(GROUPS))]
        result[f"reference{kind}_s"] = seconds["setup"] + float(sum(per_group)) * n_layers
        result[f"fast{kind}_s"] = seconds["fast"]
        result[f"clean_forward{kind}_s"] = seconds["clean_forward"]
    result["fast_engine"] = fast.name
    return result


def main(args, loaded) -> dict:
    """The patching benchmark on `loaded` with the knockout benchmark's arguments."""
    from mmflow.bench.common import gqa_samples, model_summary, noise_image, ratios

    load_before = os.getloadavg()[0]
    totals: dict[str, float] = {}
    lengths, names = [], set()
    for index, sample in enumerate(gqa_samples(args.task, args.samples)):
        inputs = encode(loaded, sample, noise_image(index))
        if index == 0:
            ReferenceEngine(loaded, "sdpa").clean(inputs)  # warm-up, not timed
        result = run_sample(loaded, inputs, sample, args.window, args.reference_windows, args.repeats)
        names.add(result.pop("fast_engine"))
        print(json.dumps({"sample": sample.question_id, "length": inputs.length, **result}), flush=True)
        for key, value in result.items():
            totals[key] = (
                max(totals.get(key, 0), value) if key == "max_abs_diff_p" else totals.get(key, 0) + value
            )
        lengths.append(inputs.length)
    summary = {
        "analysis": "patching",
        "geometry": args.geometry,
        "samples": len(lengths),
        "sequence_lengths": lengths,
        "model": model_summary(loaded, args),
        "corruption": "noise",
        "groups": list(GROUPS),
        "window": args.window,
        "jobs_per_sample": len(GROUPS) * loaded.n_layers,
        "engine": sorted(names),
        **ratios(totals, ""),
        "reference_is": "clean states + corrupted run + one full forward per centre layer per group",
        "fast_s_includes": "clean pass + corrupted pass (both cached) + every restore job",
        "max_abs_diff_p": totals["max_abs_diff_p"],
        "process_cpu_time": ratios(totals, "_cpu"),
        "torch_threads": torch.get_num_threads(),
        "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }
    print(json.dumps(summary), flush=True)
    return summary
