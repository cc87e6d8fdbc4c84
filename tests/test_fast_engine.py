"""The fast engine gives the reference engine's numbers, on fresh random inputs, or says it fell back."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from mmflow.data.sample import Box, Sample
from mmflow.inputs.encode import encode
from mmflow.inputs.groups import build_token_groups
from mmflow.knockout import fast as fast_module
from mmflow.knockout import kernels, make_engine, rows
from mmflow.knockout.fast import FastEngine
from mmflow.knockout.reference import ReferenceEngine
from mmflow.knockout.spec import NAMED_KNOCKOUTS, BlockEdges, KnockoutJob, window_layers
from mmflow.models.anatomy import anatomy_of
from mmflow.models.registry import get_model

CONF = Path(__file__).resolve().parents[1] / "conf" / "model"
TOLERANCE = 1e-5  # max |p_new difference| over the whole vocabulary, float32
LOGP_TOLERANCE = 1e-4  # the same in log-probability: random-weight models have p ~ 1/V everywhere
KNOCKOUTS = {**NAMED_KNOCKOUTS, "true_option_to_last": ("true_option", "last")}
QUESTIONS = [  # (question, true option, false option): option words appear in the question
    ("Is the jar full or empty?", "empty", "full"),
    ("Which side of the photo is the curtain on, the left or the right?", "right", "left"),
    ("Is the small dog brown or white?", "white", "brown"),
    ("Are the flowers in the vase red or yellow?", "red", "yellow"),
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models are all small ops: syncing two OpenMP threads costs more than it saves, and far more
    when the two cores are shared (the file runs ~6x faster on one thread then)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def fast_models() -> dict:
    """Both tiny models, loaded once through the registry from their conf/model yaml."""
    models = {}
    for name in ("tiny-llava", "tiny-llava-next"):
        config = OmegaConf.to_container(OmegaConf.load(CONF / f"{name}.yaml"), resolve=True)
        models[name] = get_model(config)
    return models


def random_sample(folder: Path, rng: np.random.Generator, size: tuple[int, int]) -> Sample:
    """A random question over a noise JPEG of `size` with a random object box."""
    width, height = size
    path = folder / f"noise-{rng.integers(1 << 30)}.jpg"
    Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)).save(path, quality=90)
    question, true, false = QUESTIONS[int(rng.integers(len(QUESTIONS)))]
    w, h = int(rng.integers(30, width // 2)), int(rng.integers(30, height // 2))
    box = Box(float(rng.integers(0, width - w)), float(rng.integers(0, height - h)), float(w), float(h))
    return Sample(path.stem, "ChooseAttr", path, question, true, size, ("object",), (box,), true, false)


def prepared(loaded, folder: Path, rng: np.random.Generator, size: tuple[int, int]):
    sample = random_sample(folder, rng, size)
    inputs = encode(loaded, sample)
    return inputs, build_token_groups(loaded, inputs, sample)


def run_both(loaded, inputs, jobs: list[KnockoutJob], engine: FastEngine | None = None):
    """(fast log-probs [J, V], reference log-probs [J, V], reference clean pass).

    Without an `engine` argument the fast engine must not have fallen back to the reference.
    """
    expect_fast = engine is None
    engine = engine or FastEngine(loaded, "sdpa")
    reference = ReferenceEngine(loaded, "sdpa")
    fast_clean = engine.clean(inputs, first_target=min(job.edges.first_target for job in jobs))
    ref_clean = reference.clean(inputs)
    assert torch.equal(fast_clean.logprobs, ref_clean.logprobs)  # p_base: the very same clean forward
    assert torch.equal(fast_clean.last_hidden, ref_clean.last_hidden)
    fast = engine.run(fast_clean, jobs)
    assert engine.name == "fast" or not expect_fast
    return fast, reference.run(ref_clean, jobs), ref_clean


def assert_same(fast: torch.Tensor, ref: torch.Tensor) -> None:
    """Fast and reference log-probs [J, V] agree in probability and in log-probability."""
    assert float((fast.exp() - ref.exp()).abs().max()) <= TOLERANCE
    assert float((fast - ref).abs().max()) <= LOGP_TOLERANCE


def sharpened(loaded, factor: float = 4.0):
    """A copy whose attention is peaked (q, k weights x factor): wrong keys or positions then show."""
    model = copy.deepcopy(loaded.model)
    with torch.no_grad():
        for layer in anatomy_of(model).layers:
            layer.self_attn.q_proj.weight.mul_(factor)
            layer.self_attn.k_proj.weight.mul_(factor)
    return dataclasses.replace(loaded, model=model)


def named_jobs(
    groups, n_layers: int, rng: np.random.Generator, every_width: bool = True
) -> list[KnockoutJob]:
    """Every knockout type at windows 1, 3 and full depth (all layers), at random centres.

    Without `every_width`, one of the three widths per type, drawn at random (fewer reference forwards).
    """
    jobs = []
    for source, target in KNOCKOUTS.values():
        edges = BlockEdges(groups.require(source), groups.require(target))
        windows = [
            window_layers(int(rng.integers(n_layers)), 1, n_layers),
            window_layers(int(rng.integers(n_layers)), 3, n_layers),
            range(n_layers),
        ]
        chosen = windows if every_width else [windows[int(rng.integers(3))]]
        jobs += [KnockoutJob(edges, layers) for layers in chosen]
    return jobs


@pytest.mark.parametrize(
    ("name", "seed", "sizes"),
    [
        ("tiny-llava", 1, [(640, 480), (333, 500), (280, 260)]),
        ("tiny-llava-next", 2, [(500, 375), (300, 620)]),
    ],
)
def test_every_knockout_type_matches_reference(fast_models, tmp_path, name, seed, sizes):
    loaded = fast_models[name]
    rng = np.random.default_rng(seed)
    for n, size in enumerate(sizes):  # all widths on the first sample, one random width after that
        inputs, groups = prepared(loaded, tmp_path, rng, size)
        jobs = named_jobs(groups, loaded.n_layers, rng, every_width=n == 0)
        fast, ref, clean = run_both(loaded, inputs, jobs)
        assert_same(fast, ref)
        assert (ref - clean.logprobs).abs().max() > 1e-2  # the knockouts do change the output
        assert fast.dtype == torch.float32 and fast.shape == (len(jobs), clean.logprobs.shape[0])


def test_matches_reference_with_peaked_attention(fast_models, tmp_path):
    loaded = sharpened(fast_models["tiny-llava"])
    rng = np.random.default_rng(3)
    inputs, groups = prepared(loaded, tmp_path, rng, (500, 375))
    fast, ref, clean = run_both(loaded, inputs, named_jobs(groups, loaded.n_layers, rng))
    assert_same(fast, ref)
    assert (ref - clean.logprobs).abs().max() > 1e-2


def random_positions(rng: np.random.Generator, low: int, high: int, most: int) -> torch.Tensor:
    count = int(rng.integers(1, most + 1))
    return torch.tensor(sorted(rng.choice(np.arange(low, high), size=count, replace=False)))


def test_random_position_sets_match_reference(fast_models, tmp_path, monkeypatch):
    loaded = fast_models["tiny-llava"]
    monkeypatch.setattr(kernels, "MASK_BUDGET", 5_000)  # chunked suffix masks
    monkeypatch.setattr(rows, "SWEEP_TOKENS", 1)  # several passes over the layers
    sweeps = []
    sweep = FastEngine._sweep
    monkeypatch.setattr(FastEngine, "_sweep", lambda self, *args: sweeps.append(1) or sweep(self, *args))
    rng = np.random.default_rng(11)
    inputs, _ = prepared(loaded, tmp_path, rng, (420, 380))
    length, n_layers = inputs.length, loaded.n_layers
    jobs = []
    for _ in range(6):  # anywhere in the sequence: sources may follow, precede or overlap targets
        edges = BlockEdges(random_positions(rng, 0, length, 60), random_positions(rng, 1, length, 12))
        centre, width = int(rng.integers(n_layers)), int(rng.integers(1, n_layers + 1))
        jobs.append(KnockoutJob(edges, window_layers(centre, width, n_layers)))
    first = int(rng.integers(length // 2, length - 5))
    every_prefix_key = BlockEdges(torch.arange(first), torch.tensor([first, first + 2, length - 1]))
    self_and_suffix = BlockEdges(torch.arange(first, length), torch.arange(first + 1, length))
    jobs += [KnockoutJob(every_prefix_key, range(2, 6)), KnockoutJob(self_and_suffix, range(n_layers))]
    fast, ref, clean = run_both(loaded, inputs, jobs)
    assert_same(fast, ref)
    assert (ref - clean.logprobs).abs().max() > 1e-2
    assert len(sweeps) > 1


def test_explicit_attention_path_matches_reference(fast_models, tmp_path, monkeypatch):
    """The non-fused attention (what non-CPU devices use), chunked, gives the same numbers."""
    loaded = fast_models["tiny-llava"]
    monkeypatch.setattr(kernels, "FLASH_DTYPES", frozenset())
    monkeypatch.setattr(kernels, "SCORE_BUDGET", 200_000)
    rng = np.random.default_rng(4)
    inputs, groups = prepared(loaded, tmp_path, rng, (375, 500))
    jobs = named_jobs(groups, loaded.n_layers, rng, every_width=False)
    fast, ref, _ = run_both(loaded, inputs, jobs)
    assert_same(fast, ref)


def test_knockout_that_changes_nothing_gives_p_base_exactly(fast_models, tmp_path):
    loaded = fast_models["tiny-llava"]
    inputs, groups = prepared(loaded, tmp_path, np.random.default_rng(5), (500, 375))
    last = groups.last
    jobs = [
        KnockoutJob(BlockEdges(groups.image, groups.question), range(0)),  # empty window
        KnockoutJob(BlockEdges(torch.empty(0, dtype=torch.long), groups.question), range(8)),  # no sources
        KnockoutJob(BlockEdges(last, groups.question), range(8)),  # sources after every target
        KnockoutJob(BlockEdges(groups.image, groups.question), range(8, 12)),  # window above the model
    ]
    fast, ref, clean = run_both(loaded, inputs, jobs)
    for row in (*fast, *ref):
        assert torch.equal(row, clean.logprobs)


def test_refuses_the_knockouts_the_reference_refuses(fast_models, tmp_path):
    loaded = fast_models["tiny-llava"]
    inputs, _ = prepared(loaded, tmp_path, np.random.default_rng(6), (300, 300))
    engine = FastEngine(loaded, "sdpa")
    blind = KnockoutJob(BlockEdges(torch.arange(5), torch.tensor([4])), range(2))  # 4 sees nothing
    with pytest.raises(ValueError, match="blocks every key"):
        engine.run(engine.clean(inputs, first_target=4), [blind])


def test_targets_before_the_captured_first_target_use_the_reference(fast_models, tmp_path):
    loaded = fast_models["tiny-llava"]
    inputs, groups = prepared(loaded, tmp_path, np.random.default_rng(8), (500, 375))
    engine = FastEngine(loaded, "sdpa")
    jobs = [KnockoutJob(BlockEdges(groups.image, groups.question), range(1, 4))]
    clean = engine.clean(inputs, first_target=int(groups.last[0]))  # planned later than this job
    ref = ReferenceEngine(loaded, "sdpa")
    assert torch.equal(engine.run(clean, jobs), ref.run(ref.clean(inputs), jobs))
    assert engine.name.startswith("fast (reference fallback")


def test_unsupported_models_fall_back_to_the_reference(fast_models, tmp_path, monkeypatch):
    loaded = fast_models["tiny-llava"]
    monkeypatch.setattr(fast_module, "SUPPORTED_MODEL_TYPES", frozenset({"mistral"}))
    engine = make_engine("fast", loaded, "sdpa")
    assert engine.name.startswith("reference (fallback: ") and "Llama-style" in engine.name
    inputs, groups = prepared(loaded, tmp_path, np.random.default_rng(9), (400, 300))
    jobs = named_jobs(groups, loaded.n_layers, np.random.default_rng(10))[:3]
    ref = ReferenceEngine(loaded, "sdpa")
    assert torch.equal(engine.run(engine.clean(inputs, 0), jobs), ref.run(ref.clean(inputs), jobs))


def test_probe_catches_an_inexact_shortcut(fast_models, tmp_path, monkeypatch):
    """If the suffix recompute were wrong (here: no rotary), the probe sends the sample to the reference."""
    loaded = fast_models["tiny-llava"]
    inputs, groups = prepared(loaded, tmp_path, np.random.default_rng(12), (500, 375))
    jobs = named_jobs(groups, loaded.n_layers, np.random.default_rng(13), every_width=False)[:4]
    monkeypatch.setattr(fast_module, "_rotate", lambda x, cos, sin: x)
    engine = FastEngine(loaded, "sdpa")
    fast, ref, _ = run_both(loaded, inputs, jobs, engine)
    assert_same(fast, ref)
    assert "probe mismatch" in engine.name
