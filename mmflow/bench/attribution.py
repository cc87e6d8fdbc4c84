"""`python -m mmflow.bench --analysis attribution`: the attribution screen vs exact per-head knockouts.

On two models in one run, toy-llava (its trained weights, shapes ChooseAttr) and the `--geometry`
random-weight model (default LLaVA-1.5: 32 layers, `--heads` 32 heads, 576 image tokens, GQA questions,
noise images), per sample and knockout type (`--knockouts`, default image_to_question), every layer x
head with window 1:
- `attribution_s`: what an attribution cell spends: the fast engine's clean pass, one forward + one
  backward with gradients (`answer_gradients`), the estimates, and the exact verification of the top
  `--top-k` estimates plus as many random controls; `screen_s` is the same without the verification;
- `exact_s`: `knockout.heads=each` over the same grid: the fast engine's clean pass + L x H jobs.
`speedup_ceiling` = exact_s / clean_s bounds `speedup` (both sides pay the clean pass);
`speedup_beyond_clean` compares what each adds to it. `gradients_s` times the gradient runs alone, one
per sample and batched over the model's samples (`answer_gradients_batch`).
Best of `--repeats` rounds, summed over samples. The exact run also scores the estimates over the whole
grid: Spearman per sample (mean) and pooled. The last stdout line is one JSON object.
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch
from scipy.stats import spearmanr

from mmflow.inputs.encode import encode
from mmflow.inputs.groups import build_token_groups
from mmflow.knockout.attribution import answer_gradients, answer_gradients_batch, layer_head_estimates
from mmflow.knockout.fast import make_fast_engine
from mmflow.knockout.spec import NAMED_KNOCKOUTS, BlockEdges, KnockoutJob

TOY_TASK = "ChooseAttr"


def _screen(engine, loaded, inputs, edges: BlockEdges, verify: int) -> tuple[torch.Tensor, int]:
    clean = engine.clean(inputs, first_target=edges.first_target)
    token = clean.top1
    estimates = layer_head_estimates(
        answer_gradients(loaded, inputs, token, clean), edges.sources, edges.targets
    )
    if verify:
        flat = estimates.flatten()
        chosen = torch.cat([flat.abs().topk(verify).indices, torch.randperm(flat.numel())[:verify]])
        heads = estimates.shape[1]
        jobs = [KnockoutJob(edges, range(i // heads, i // heads + 1), (i % heads,)) for i in chosen.tolist()]
        engine.run(clean, jobs)
    return estimates, token


def _exact(engine, inputs, edges: BlockEdges, layers: int, heads: int) -> tuple[torch.Tensor, int]:
    clean = engine.clean(inputs, first_target=edges.first_target)
    jobs = [
        KnockoutJob(edges, range(layer, layer + 1), (head,))
        for layer in range(layers)
        for head in range(heads)
    ]
    token = clean.top1
    return (engine.run(clean, jobs)[:, token] - clean.logprobs[token]).view(layers, heads), token


def _time_one(engine, loaded, inputs, edges: BlockEdges, top_k: int, repeats: int):
    """Best-of-`repeats` timings of the screen (with and without verification) and of the exact grid."""
    from mmflow.bench.common import Best

    heads = loaded.model.config.get_text_config().num_attention_heads
    best = Best()
    for _ in range(repeats):
        best.time("clean", lambda: engine.clean(inputs, first_target=edges.first_target))
        estimates, token = best.time("attribution", lambda: _screen(engine, loaded, inputs, edges, top_k))
        best.time("screen", lambda: _screen(engine, loaded, inputs, edges, 0))
        exact, exact_token = best.time("exact", lambda: _exact(engine, inputs, edges, loaded.n_layers, heads))
        if token != exact_token:
            raise RuntimeError("the screen and the exact run disagree on the answer token")
    return best, estimates, exact


def _time_gradients(engine, loaded, prepared, repeats: int) -> tuple[float, float]:
    """Best-of-`repeats` seconds of the gradient runs of all `prepared` [(inputs, edges)]: one
    `answer_gradients` per sample, and one `answer_gradients_batch` over all of them."""
    from mmflow.bench.common import Best

    items = []
    for inputs, edges in prepared:
        clean = engine.clean(inputs, first_target=edges.first_target)
        items.append((inputs, clean.top1, clean))
    best = Best()
    for _ in range(repeats):
        best.time("alone", lambda: [answer_gradients(loaded, *item) for item in items])
        best.time("batched", lambda: answer_gradients_batch(loaded, items))
    return best.wall["alone"], best.wall["batched"]


def bench_model(loaded, samples, knockouts, top_k: int, repeats: int) -> dict:
    """Timings and agreement of one model over `samples` [(sample, image or None)]."""
    engine = make_fast_engine(loaded, "sdpa")
    heads = loaded.model.config.get_text_config().num_attention_heads
    totals: dict[str, float] = {}
    rhos, pooled, lengths, prepared = [], ([], []), [], []
    for index, (sample, image) in enumerate(samples):
        inputs = encode(loaded, sample, image) if image is not None else encode(loaded, sample)
        groups = build_token_groups(loaded, inputs, sample)
        lengths.append(inputs.length)
        for name in knockouts:
            source, target = NAMED_KNOCKOUTS[name]
            edges = BlockEdges(groups.require(source), groups.require(target))
            prepared.append((inputs, edges))
            if index == 0:
                _screen(engine, loaded, inputs, edges, 0)  # warm-up, not timed
            best, estimates, exact = _time_one(engine, loaded, inputs, edges, top_k, repeats)
            for key, seconds in best.wall.items():
                totals[f"{key}_s"] = totals.get(f"{key}_s", 0.0) + seconds
            for key, seconds in best.cpu.items():
                totals[f"{key}_cpu_s"] = totals.get(f"{key}_cpu_s", 0.0) + seconds
            rhos.append(float(spearmanr(estimates.flatten(), exact.flatten())[0]))
            pooled[0].extend(estimates.flatten().tolist())
            pooled[1].extend(exact.flatten().tolist())
    n = len(samples)
    alone, batched = _time_gradients(engine, loaded, prepared, repeats)
    return {
        "model": loaded.name,
        "layers": loaded.n_layers,
        "heads": heads,
        "samples": n,
        "sequence_lengths": lengths,
        "engine": engine.name,
        "attribution_s_per_sample": round(totals["attribution_s"] / n, 4),
        "screen_s_per_sample": round(totals["screen_s"] / n, 4),
        "exact_s_per_sample": round(totals["exact_s"] / n, 4),
        "clean_s_per_sample": round(totals["clean_s"] / n, 4),
        "attribution_over_clean": round(totals["attribution_s"] / totals["clean_s"], 2),
        "exact_over_clean": round(totals["exact_s"] / totals["clean_s"], 2),
        "speedup": round(totals["exact_s"] / totals["attribution_s"], 2),
        "speedup_screen_only": round(totals["exact_s"] / totals["screen_s"], 2),
        "speedup_cpu": round(totals["exact_cpu_s"] / totals["attribution_cpu_s"], 2),
        "speedup_ceiling": round(totals["exact_s"] / totals["clean_s"], 2),
        "speedup_ceiling_cpu": round(totals["exact_cpu_s"] / totals["clean_cpu_s"], 2),
        "speedup_beyond_clean": round(
            (totals["exact_s"] - totals["clean_s"]) / (totals["attribution_s"] - totals["clean_s"]), 2
        ),
        "gradients_s_per_sample": round(alone / n, 4),
        "gradients_batched_s_per_sample": round(batched / n, 4),
        "spearman_mean_per_sample": round(float(np.nanmean(rhos)), 4),
        "spearman_pooled": round(float(spearmanr(*pooled)[0]), 4),
    }


def toy_loaded():
    """toy-llava with its committed weights (its model config, as a cell would load it)."""
    from omegaconf import OmegaConf

    from mmflow.config.dirs import CONF_DIR
    from mmflow.models.registry import get_model

    path = CONF_DIR / "model" / "toy-llava.yaml"
    return get_model(OmegaConf.to_container(OmegaConf.load(path), resolve=True))


def main(args, loaded) -> dict:
    """The attribution benchmark: toy-llava, then `loaded` (the geometry model), one JSON line."""
    import tempfile

    from mmflow.bench.common import GEOMETRIES, gqa_samples, noise_image
    from mmflow.data import load_shapes
    from mmflow.data.sample import Sample

    knockouts = [k.strip() for k in args.knockouts.split(",") if k.strip()]
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as folder:
        shapes = [
            s
            for s in load_shapes(TOY_TASK, args.toy_samples, seed=0, cache_dir=folder)
            if isinstance(s, Sample)
        ]
        toy = bench_model(toy_loaded(), [(s, None) for s in shapes], knockouts, args.top_k, args.repeats)
    questions = gqa_samples(args.task, args.samples)
    geometry = bench_model(
        loaded, [(s, noise_image(i)) for i, s in enumerate(questions)], knockouts, args.top_k, args.repeats
    )
    geometry["geometry_of"] = GEOMETRIES[args.geometry].like
    summary = {
        "analysis": "attribution",
        "knockouts": knockouts,
        "window": 1,
        "top_k": args.top_k,
        "controls": args.top_k,
        "toy": {**toy, "task": TOY_TASK},
        args.geometry: geometry,
        "attribution_s_is": "fast clean pass + forward/backward + estimates + top-k and controls exact",
        "clean_s_is": "the fast engine's clean pass alone (what every cell of the sample pays anyway)",
        "exact_s_is": "fast clean pass + every layer x head knockout (knockout.heads=each, window 1)",
        "speedup_ceiling_is": "exact_s / clean_s: the speedup of a screen that costs only the clean pass",
        "speedup_beyond_clean_is": "(exact_s - clean_s) / (attribution_s - clean_s): past the clean pass",
        "gradients_s_is": "gradient runs only (answer_gradients per sample; _batched: all at once)",
        "timing": f"best of {args.repeats} rounds per sample, summed over samples, divided by samples",
        "torch_threads": torch.get_num_threads(),
        "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }
    print(json.dumps(summary), flush=True)
    return summary
