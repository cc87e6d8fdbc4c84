"""Measure the fast engine's probe against the dithered rounding noise at full width (docs/statistics.md).

    PYTHONPATH=. python scripts/noise_floor_probe.py --layers 4 --mlp 1024 --dtype bfloat16

Random weights at LLaVA-1.5-7B's width (4096, 32 heads), CPU; one line per sequence length.
"""

from __future__ import annotations

import argparse

import torch

from mmflow.inputs.encode import ModelInputs
from mmflow.knockout.fast import FastEngine
from mmflow.knockout.noise import top_distance
from mmflow.knockout.spec import BlockEdges, KnockoutJob
from mmflow.models.registry import LoadedModel
from mmflow.models.synthetic.builder import ModelSpec, TextSpec, VisionSpec, build_weights, model_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--mlp", type=int, default=1024)
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--logit-scale", type=float, default=1.0)
    args = parser.parse_args()
    text = TextSpec(hidden=4096, intermediate=args.mlp, layers=args.layers, heads=32, kv_heads=32)
    vision = VisionSpec(32, 64, 1, 2, image_size=28, patch_size=14, projection_dim=32)
    spec = ModelSpec("llava", text, vision, vocab_size=512, image_token_id=511, bos_token_id=1)
    model = build_weights(model_config(spec), seed=0, dtype=getattr(torch, args.dtype)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(args.logit_scale)
    loaded = LoadedModel("full-width", model, None, "full-width", "plain", "pad", torch.device("cpu"))
    engine = FastEngine(loaded, "sdpa")
    for seed in range(6):
        length = 16 + 8 * seed
        ids = torch.randint(3, 500, (1, length), generator=torch.Generator().manual_seed(seed))
        inputs = ModelInputs(None, {"input_ids": ids}, None, [], (0, 0))
        clean = engine.clean(inputs, first_target=length // 2)
        edges = BlockEdges(torch.arange(length // 4), torch.arange(length // 2, length))
        engine.run(clean, [KnockoutJob(edges, (args.layers - 1,))])
        probe = top_distance(clean.probe, clean.logprobs)
        dither = top_distance(engine.dithered(clean), clean.logprobs)
        floor = engine.noise_floor_pct(clean, clean.top1)
        print(f"T={length:3d} probe {probe:.4f} dithered {dither:.4f} floor {floor:.3g}% of p", flush=True)
    print(f"engine: {engine.name}")


if __name__ == "__main__":
    main()
