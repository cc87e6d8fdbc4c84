"""The issue-17 table: per model, decoder, image tokens and sequence length for a 500 x 375 image, the
engine that ran, and the fast engine's parity with the reference engine (max |delta p| over the whole
vocabulary, every knockout type at windows 1, 3 and full depth, float32).

    MMFLOW_CACHE=... .venv/bin/python scripts/series_table.py [model ...]   # JSON lines, then a table

Runs on the tiny replicas (CPU, minutes); with a real config name and its weights it measures that.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from PIL import Image

from mmflow.data.sample import Box, Sample
from mmflow.inputs.encode import encode
from mmflow.inputs.groups import build_token_groups
from mmflow.knockout import make_engine
from mmflow.knockout.reference import ReferenceEngine
from mmflow.knockout.spec import NAMED_KNOCKOUTS, BlockEdges, KnockoutJob, window_layers
from mmflow.models.registry import get_model

CONF = Path(__file__).resolve().parents[1] / "conf" / "model"
DEFAULT = ["tiny-llava-1.6-mistral", "tiny-llava-1.6-34b", "tiny-llava-onevision", "tiny-qwen2.5-vl"]


def measure(name: str, folder: Path) -> dict:
    loaded = get_model(OmegaConf.to_container(OmegaConf.load(CONF / f"{name}.yaml"), resolve=True))
    rng = np.random.default_rng(0)
    path = folder / f"{name}.jpg"
    Image.fromarray(rng.integers(0, 256, size=(375, 500, 3), dtype=np.uint8)).save(path, quality=95)
    box = Box(150.0, 100.0, 120.0, 90.0)
    question = "Is the jar full or empty?"
    sample = Sample(name, "ChooseAttr", path, question, "empty", (500, 375), ("jar",), (box,))
    inputs = encode(loaded, sample)
    groups = build_token_groups(loaded, inputs, sample)
    n_layers = loaded.n_layers
    jobs = []
    for source, target in NAMED_KNOCKOUTS.values():
        edges = BlockEdges(groups.require(source), groups.require(target))
        centre = int(rng.integers(n_layers))
        jobs += [KnockoutJob(edges, window_layers(centre, k, n_layers)) for k in (1, 3)]
        jobs.append(KnockoutJob(edges, range(n_layers)))
    started = time.time()
    engine = make_engine("fast", loaded, "sdpa")
    fast = engine.run(engine.clean(inputs, first_target=min(j.edges.first_target for j in jobs)), jobs)
    fast_seconds = time.time() - started
    reference = ReferenceEngine(loaded, "sdpa")
    clean = reference.clean(inputs)
    ref = reference.run(clean, jobs)
    return {
        "model": name,
        "decoder": loaded.model.config.get_text_config().model_type,
        "image_tokens": int(groups.image.numel()),
        "sequence_length": inputs.length,
        "engine": engine.name,
        "jobs": len(jobs),
        "parity_max_abs_dp": float((fast.exp() - ref.exp()).abs().max()),
        "parity_max_abs_dlogp": float((fast - ref).abs().max()),
        "knockout_max_abs_dlogp": float((ref - clean.logprobs).abs().max()),  # what the knockouts change
        "knockout_max_abs_dp": float((ref.exp() - clean.logprobs.exp()).abs().max()),  # vs clean
        "fast_seconds": round(fast_seconds, 2),
    }


def main(names: list[str]) -> None:
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for name in names:
            row = measure(name, Path(folder))
            print(json.dumps(row), flush=True)
            rows.append(row)
    print("\n| model | decoder | image tokens (500x375) | sequence | engine | parity max abs dp | dlogp |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['decoder']} | {r['image_tokens']} | {r['sequence_length']} | "
            f"{r['engine']} | {r['parity_max_abs_dp']:.1e} | {r['parity_max_abs_dlogp']:.1e} |"
        )


if __name__ == "__main__":
    main(sys.argv[1:] or DEFAULT)
