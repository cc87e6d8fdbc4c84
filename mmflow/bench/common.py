"""What the benchmark CLIs share (`mmflow.bench.engine`, `mmflow.bench.pipeline`, `mmflow.bench.patching`):
the random-weight models at a real model's sequence geometry, the questions and noise images, the
best-of-rounds timer, the memory peak and the summary fields. Imports none of the CLIs back.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mmflow.data.gqa import GQA_TASKS_DIR, read_task_csv
from mmflow.data.sample import Sample
from mmflow.models.registry import LoadedModel
from mmflow.models.synthetic.tiny import (
    TinySpec,
    build_model,
    build_processor,
    build_tokenizer,
    tokenizer_corpus,
)

IMAGE_SIZE = (500, 375)  # (width, height): ~2,340 image tokens under LLaVA-NeXT anyres


@dataclass(frozen=True)
class Geometry:
    """A real model's sequence geometry at a CPU-sized width."""

    like: str  # the real checkpoint whose geometry this copies
    architecture: str
    tokenizer_style: str
    prompt_format: str
    image_preprocess: str
    kv_heads: int
    rope_theta: float


GEOMETRIES = {
    "llava-1.5": Geometry(
        "llava-hf/llava-1.5-7b-hf: vicuna_v1 prompt, 576 image tokens, multi-head attention",
        "llava",
        "sentencepiece",
        "vicuna_v1",
        "pad",
        kv_heads=8,
        rope_theta=10000.0,
    ),
    "llava-next": Geometry(
        "llava-hf/llama3-llava-next-8b-hf: llama3 prompt, anyres tiles + newlines, GQA 4:1",
        "llava_next",
        "byte_level",
        "llama3",
        "anyres",
        kv_heads=2,
        rope_theta=500000.0,
    ),
}


def build_loaded(geometry: str, layers: int, hidden: int, heads: int) -> LoadedModel:
    """A random-weight LLaVA(-NeXT) with the geometry's tokenizer, processor and GQA ratio."""
    geo = GEOMETRIES[geometry]
    spec = TinySpec(
        name=f"bench-{geometry}",
        architecture=geo.architecture,
        tokenizer_style=geo.tokenizer_style,
        prompt_format=geo.prompt_format,
        text_layers=layers,
        text_hidden=hidden,
        text_heads=heads,
        text_kv_heads=min(geo.kv_heads, heads),
        rope_theta=geo.rope_theta,
    )
    tokenizer = build_tokenizer(spec.tokenizer_style, spec.vocab_size, tokenizer_corpus())
    model = build_model(spec, tokenizer).eval()
    return LoadedModel(
        name=spec.name,
        model=model,
        processor=build_processor(spec, tokenizer),
        path=f"random:{spec.name}",
        prompt_format=spec.prompt_format,
        image_preprocess=geo.image_preprocess,
        device=torch.device("cpu"),
    )


def gqa_samples(task: str, n: int) -> list[Sample]:
    """The first `n` usable rows of a real GQA task file (their images are replaced by noise)."""
    rows = read_task_csv(GQA_TASKS_DIR / f"{task}.csv", task, Path("/nonexistent"), check_images=False)
    return [row for row in rows if isinstance(row, Sample)][:n]


def noise_image(seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(IMAGE_SIZE[1], IMAGE_SIZE[0], 3))
    return Image.fromarray(pixels.astype(np.uint8))


class Best:
    """Minimum wall and process-CPU seconds per key over repeated rounds (least disturbed run)."""

    def __init__(self):
        self.wall: dict = {}
        self.cpu: dict = {}

    def time(self, key, fn):
        sync()
        start, cpu = time.perf_counter(), time.process_time()
        out = fn()
        sync()
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
        self.wall[key] = min(self.wall.get(key, wall), wall)
        self.cpu[key] = min(self.cpu.get(key, cpu), cpu)
        return out


def sync() -> None:
    """Wait for queued CUDA work, so that wall-clock timings on a GPU include it."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_bytes(fn) -> int:
    """Peak of torch CPU allocations during fn() above the level before it (torch.profiler events)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
    )
    level = peak = 0
    for _, nbytes in events:
        level += nbytes
        peak = max(peak, level)
    return peak


def ratios(totals: dict[str, float], kind: str) -> dict:
    """The three timings (wall, or process CPU with kind="_cpu"), speedup and fast/clean."""
    reference, fast, clean = (totals[f"{name}{kind}_s"] for name in ("reference", "fast", "clean_forward"))
    return {
        "reference_s": round(reference, 3),
        "fast_s": round(fast, 3),
        "clean_forward_s": round(clean, 3),
        "speedup": round(reference / fast, 2),
        "fast_over_clean": round(fast / clean, 3),
    }


def model_summary(loaded: LoadedModel, args: argparse.Namespace) -> dict:
    text = loaded.model.config.get_text_config()
    vision = loaded.model.config.vision_config
    return {
        "layers": text.num_hidden_layers,
        "hidden": text.hidden_size,
        "intermediate": text.intermediate_size,
        "heads": text.num_attention_heads,
        "kv_heads": text.num_key_value_heads,
        "vision_layers": vision.num_hidden_layers,
        "vision_hidden": vision.hidden_size,
        "dtype": str(loaded.model.dtype).removeprefix("torch."),
        "weights": "random",
    }
