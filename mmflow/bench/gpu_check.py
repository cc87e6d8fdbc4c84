"""GPU check: full-size random-weight LLaVA-1.5-7B and LLaMA-3-LLaVA-NeXT-8B, engine and pipeline on CUDA.

Run by `scripts/gpu_check.sh` (which first installs the carried wheels); `python -m mmflow.bench.gpu_check`.
For each model and dtype (float16, bfloat16) it builds the model directly on the device with the real
dimensions (no download; random weights), then prints one JSON line per check:

- `engine`: the engine benchmark on one GQA-like sample (the four main knockouts, all 32 windows):
  fast vs reference (the paper's algorithm, a few windows timed and scaled) vs one clean forward,
  and `max_abs_diff_p`, the fast-vs-reference difference of every vocabulary probability on CUDA;
- `pipeline`: `mmflow.bench.pipeline.run_pipeline`, `run_cells` end to end (the in-process path, no
  Ray) on all six knockouts, against one clean forward and the paper's algorithm;
- `memory`: peak allocated device memory of a cell batch (six cells, one sample) against one clean pass.

The last line is a `summary` with what could not be done and, when the 7B/8B figures exist, the
GPU-hours of the paper's grid (4 models x 6 tasks x 6 knockouts, ~5,500 samples per model) with
mmflow and with the paper's algorithm. `--dry-run` uses tiny widths (real sequence geometry) on
whatever device there is, so CI can check that this script still works; it says what it skipped.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import time
import traceback
from dataclasses import dataclass

import torch

GRID_SAMPLES_PER_MODEL = 5500  # the paper's six GQA task files, per model
GRID_MODELS = {  # the paper's four models -> the measured model whose per-sample cost stands in for it
    "llava-1.5-7b": ("llava-1.5-7b", 1.0),
    "llava-1.5-13b": ("llava-1.5-7b", 13.0 / 7.0),  # same geometry, ~13/7 the FLOPs per token
    "llava-1.6-vicuna-7b": ("llama3-llava-next-8b", 1.0),  # anyres geometry, ~7B decoder
    "llama3-llava-next-8b": ("llama3-llava-next-8b", 1.0),
}


@dataclass(frozen=True)
class Size:
    """Widths of a LLaVA model: Llama decoder + CLIP vision tower."""

    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vision_hidden: int
    vision_intermediate: int
    vision_layers: int
    vision_heads: int


# name -> (bench geometry, real size)
MODELS = {
    "llava-1.5-7b": ("llava-1.5", Size(32064, 4096, 11008, 32, 32, 32, 1024, 4096, 24, 16)),
    "llama3-llava-next-8b": ("llava-next", Size(128320, 4096, 14336, 32, 32, 8, 1024, 4096, 24, 16)),
}
DRY = {  # --dry-run: real sequence geometry (image tokens, GQA ratio), 4 layers, tiny widths
    "llava-1.5-7b": Size(0, 64, 128, 4, 4, 4, 32, 64, 2, 2),
    "llama3-llava-next-8b": Size(0, 64, 128, 4, 4, 1, 32, 64, 2, 2),
}


def build_full_size(name: str, size: Size, dtype: torch.dtype, device: torch.device):
    """A random-weight LLaVA(-NeXT) of `size`, created directly on `device` (a `LoadedModel`)."""
    from mmflow.bench.engine import GEOMETRIES
    from mmflow.knockout.attention import prepare_model
    from mmflow.models.registry import LoadedModel
    from mmflow.models.synthetic.builder import (
        ModelSpec,
        TextSpec,
        VisionSpec,
        build_weights,
        model_config,
        token_ids,
    )
    from mmflow.models.synthetic.tiny import TinySpec, build_processor, build_tokenizer, tokenizer_corpus

    geo = GEOMETRIES[MODELS[name][0]]
    spec = TinySpec(name, geo.architecture, geo.tokenizer_style, geo.prompt_format)
    tokenizer = build_tokenizer(spec.tokenizer_style, spec.vocab_size, tokenizer_corpus())
    ids = token_ids(tokenizer)
    config = model_config(
        ModelSpec(
            geo.architecture,
            TextSpec(size.hidden, size.intermediate, size.layers, size.heads, size.kv_heads, geo.rope_theta),
            VisionSpec(
                *(size.vision_hidden, size.vision_intermediate, size.vision_layers, size.vision_heads),
                projection_dim=768,  # CLIP-L/336's, at 336 px and 14 px patches (the defaults)
            ),
            **{**ids, "vocab_size": max(size.vocab, ids["vocab_size"])},
        )
    )
    model = build_weights(config, seed=0, dtype=dtype, device=device).eval()
    prepare_model(model, "sdpa")
    return LoadedModel(
        name=name,
        model=model,
        processor=build_processor(spec, tokenizer),
        path=f"random:{name}",
        prompt_format=spec.prompt_format,
        image_preprocess=geo.image_preprocess,
        device=device,
    )


def emit(line: dict) -> None:
    print(json.dumps(line, default=str), flush=True)


def check_engine(loaded, base: dict, rounds: int = 2) -> dict:
    """The engine benchmark on one sample (`mmflow.bench.engine.run_sample`), on the model's device."""
    from mmflow.bench.engine import MAIN_KNOCKOUTS, gqa_samples, noise_image, plan_jobs, ratios
    from mmflow.bench.engine import run_sample as bench_sample
    from mmflow.inputs.encode import encode
    from mmflow.knockout.fast import make_fast_engine
    from mmflow.knockout.reference import ReferenceEngine

    sample = gqa_samples("QueryAttr", 1)[0]
    inputs = encode(loaded, sample, noise_image(0))
    plan, _ = plan_jobs(loaded, inputs, sample, MAIN_KNOCKOUTS, 7)
    ref, fast = ReferenceEngine(loaded, "sdpa"), make_fast_engine(loaded, "sdpa")
    ref.clean(inputs)  # warm-up
    result = bench_sample(ref, fast, inputs, plan, reference_windows=rounds, repeats=rounds)
    return {
        **base,
        "check": "engine",
        "length": inputs.length,
        "engine": fast.name,
        **ratios(result, ""),
        "max_abs_diff_p": result["max_abs_diff_p"],
    }


def check_memory(loaded, base: dict, workdir) -> dict:
    """Peak allocated device memory: one clean forward vs a cell batch (six cells) on one sample."""
    from mmflow.bench.pipeline import PAPER_KNOCKOUTS, cell_configs, write_noise_images
    from mmflow.execution.runtime import run_cells
    from mmflow.inputs.encode import encode
    from mmflow.knockout.reference import ReferenceEngine

    device = loaded.device
    (workdir / "images").mkdir(parents=True, exist_ok=True)
    sample = write_noise_images("QueryAttr", 1, workdir / "images")[0]
    inputs = encode(loaded, sample)
    configs = cell_configs(loaded, "QueryAttr", 1, 7, PAPER_KNOCKOUTS, workdir / "images", workdir / "cells")
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    ReferenceEngine(loaded, "sdpa").last_logprobs(inputs, None)
    clean = torch.cuda.max_memory_allocated(device) - before
    torch.cuda.reset_peak_memory_stats(device)
    outcomes = run_cells(loaded, configs, prefetch_depth=0)
    cell = torch.cuda.max_memory_allocated(device) - before
    gib = 1 << 30
    return {
        **base,
        "check": "memory",
        "length": inputs.length,
        "cells_done": sum(o.status == "done" for o in outcomes),
        "weights_gib": round(before / gib, 3),
        "clean_peak_above_weights_gib": round(clean / gib, 3),
        "cell_peak_above_weights_gib": round(cell / gib, 3),
        "cell_over_clean_with_weights": round((cell + before) / (clean + before), 3),
    }


def grid_hours(pipelines: dict[str, dict]) -> dict | None:
    """GPU-hours of the paper's grid from the measured per-sample seconds (None if a model is missing)."""
    if not all(model in pipelines for model, _ in GRID_MODELS.values()):
        return None
    hours = {"mmflow": 0.0, "paper": 0.0}
    for measured, scale in GRID_MODELS.values():
        figures = pipelines[measured]
        per_task_sample = {  # the pipeline runs all six knockouts per sample (six cells share it)
            "mmflow": figures["pipeline_s_per_sample"],
            "paper": figures["paper_s_per_sample"],
        }
        for key, seconds in per_task_sample.items():
            hours[key] += scale * seconds * GRID_SAMPLES_PER_MODEL / 3600
    return {
        "grid": "4 models x 6 tasks x 6 knockouts, window 7, all 32 centre layers",
        "samples_per_model": GRID_SAMPLES_PER_MODEL,
        "mmflow_gpu_hours": round(hours["mmflow"], 2),
        "paper_gpu_hours": round(hours["paper"], 1),
        "stand_ins": {k: f"{m} x {s:.2f}" for k, (m, s) in GRID_MODELS.items()},
    }


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m mmflow.bench.gpu_check", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--dry-run", action="store_true", help="tiny widths, any device (CI)")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--dtypes", default="float16,bfloat16")
    parser.add_argument("--samples", type=int, default=2, help="pipeline samples per model and dtype")
    parser.add_argument("--checks", default="engine,pipeline,memory")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    import tempfile
    from pathlib import Path

    import transformers

    from mmflow.bench.pipeline import run_pipeline

    args = parse_args(argv)
    started = time.time()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    could_not: list[str] = []
    if not cuda:
        could_not.append("no CUDA device: ran on CPU, no GPU timings, no GPU memory peaks")
    emit(
        {
            "check": "env",
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "device": torch.cuda.get_device_name(device) if cuda else "cpu",
            "dry_run": args.dry_run,
        }
    )
    checks = set(args.checks.split(","))
    pipelines: dict[str, dict] = {}
    failures = 0
    for name in args.models.split(","):
        for dtype_name in args.dtypes.split(","):
            size = DRY[name] if args.dry_run else MODELS[name][1]
            base = {"model": name, "dtype": dtype_name, "size": "dry-run" if args.dry_run else "full"}
            loaded = None
            try:
                seconds = time.perf_counter()
                loaded = build_full_size(name, size, getattr(torch, dtype_name), device)
                n_params = sum(p.numel() for p in loaded.model.parameters())
                emit(
                    {
                        **base,
                        "check": "build",
                        "parameters": n_params,
                        "seconds": time.perf_counter() - seconds,
                    }
                )
                if "engine" in checks:
                    emit(check_engine(loaded, base, rounds=1 if args.dry_run else 2))
                if "pipeline" in checks:
                    result = run_pipeline(loaded, n_samples=args.samples, repeats=1, reference_windows=3)
                    emit({**base, "check": "pipeline", **result})
                    if dtype_name == "float16" and not args.dry_run:
                        pipelines[name] = result
                if "memory" in checks and cuda:
                    with tempfile.TemporaryDirectory() as tmp:
                        emit(check_memory(loaded, base, Path(tmp)))
                elif "memory" in checks:
                    could_not.append(f"{name} {dtype_name}: memory peak needs CUDA (skipped)")
            except Exception as exc:  # report and go on with the next model/dtype
                failures += 1
                emit({**base, "check": "error", "error": f"{type(exc).__name__}: {exc}",
                      "traceback": traceback.format_exc(limit=4)})  # fmt: skip
            finally:
                del loaded
                gc.collect()
                if cuda:
                    torch.cuda.empty_cache()
    grid = grid_hours(pipelines)
    if grid is None:
        could_not.append("grid GPU-hours need the full-size float16 pipeline figures of both models")
    emit(
        {
            "check": "summary",
            "ok": failures == 0,
            "failures": failures,
            "seconds": round(time.time() - started, 1),
            "could_not": could_not,
            "grid_cost": grid,
        }
    )
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
