"""The exact-recompute floor (mmflow.knockout.cost) against a plain count over layers and positions."""

from __future__ import annotations

import random

import pytest
import torch

from mmflow.knockout.cost import DecoderShape, clean_macs, floor_over_clean, job_macs
from mmflow.knockout.spec import BlockEdges, KnockoutJob, window_layers


def brute_force(shape: DecoderShape, length: int, first_target: int, first_layer: int) -> int:
    """MACs position by position: full layers below the top, the top layer's last query only."""
    total = 0
    for layer in range(first_layer, shape.layers):
        for p in range(first_target, length):
            attention = 2 * shape.heads * shape.head_dim * (p + 1)
            if layer < shape.layers - 1 or p == length - 1:
                total += shape.token_macs + attention
            else:  # top layer, not the last position: its key and value only
                total += shape.kv_macs
    return total


def random_shape(rng: random.Random) -> DecoderShape:
    heads = rng.choice([2, 4, 8])
    return DecoderShape(
        layers=rng.randint(2, 9),
        hidden=rng.choice([16, 48]),
        heads=heads,
        kv_heads=rng.choice([h for h in (1, 2, heads) if heads % h == 0]),
        head_dim=rng.choice([4, 8]),
        intermediate=rng.choice([32, 80]),
    )


@pytest.mark.parametrize("seed", range(5))
def test_job_and_clean_macs_equal_a_plain_count(seed):
    rng = random.Random(seed)
    shape = random_shape(rng)
    length = rng.randint(3, 40)
    first_target, first = rng.randrange(length), rng.randrange(shape.layers)
    assert job_macs(shape, length, first_target, first) == brute_force(shape, length, first_target, first)
    plain = sum(shape.token_macs + 2 * shape.heads * shape.head_dim * (p + 1) for p in range(length))
    assert clean_macs(shape, length) == shape.layers * plain
    assert job_macs(shape, length, None, first) == 0  # blocks nothing: costs nothing
    assert job_macs(shape, length, 0, 0) < clean_macs(shape, length)  # the top layer's saving


def test_floor_of_window_jobs_sums_their_suffixes():
    """Question-like targets near the end from every window's first layer, one no-op job (targets before
    every source), divided by the clean passes of both samples."""
    shape = DecoderShape(layers=6, hidden=16, heads=2, kv_heads=1, head_dim=8, intermediate=32)
    samples, expected, clean = [], 0, 0
    for length in (20, 27):
        sources, targets = torch.arange(2, 12), torch.arange(length - 5, length)
        jobs = [KnockoutJob(BlockEdges(sources, targets), window_layers(c, 3, 6)) for c in range(6)]
        jobs.append(KnockoutJob(BlockEdges(torch.tensor([length - 1]), torch.tensor([0])), range(6)))
        samples.append((length, jobs))
        expected += sum(brute_force(shape, length, length - 5, max(0, c - 1)) for c in range(6))
        clean += clean_macs(shape, length)
    assert floor_over_clean(shape, samples) == pytest.approx(expected / clean, rel=1e-12)
