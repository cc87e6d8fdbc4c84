"""Head-resolved knockouts: every head = today's knockout, no head = clean, one head = a plain
re-implementation that blocks that head only, and the fast engine gives the reference's numbers."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import cell_config, model_config, noise_sample
from test_knockout_reference import _embeds, plain_forward

from mmflow.analyses import canonical_config
from mmflow.analyses.knockout import head_sets
from mmflow.execution.runtime import run_cells
from mmflow.inputs.encode import encode
from mmflow.inputs.groups import build_token_groups
from mmflow.knockout import kernels
from mmflow.knockout.fast import FastEngine
from mmflow.knockout.reference import ReferenceEngine
from mmflow.knockout.spec import BlockEdges, KnockoutJob, window_layers
from mmflow.models.registry import get_model
from mmflow.storage.store import cell_id

TOLERANCE, LOGP_TOLERANCE = 1e-5, 1e-4


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def n_heads(loaded) -> int:
    return loaded.model.config.get_text_config().num_attention_heads


def prepared(loaded, tmp_path, seed: int):
    sample = noise_sample(tmp_path, np.random.default_rng(seed), size=(400, 300))
    inputs = encode(loaded, sample)
    return inputs, build_token_groups(loaded, inputs, sample)


def test_head_sets_config():
    assert head_sets(None, 4) == [None]
    assert head_sets("each", 3) == [(0,), (1,), (2,)]
    assert head_sets([3, 1, 3], 4) == [(1, 3)] and head_sets(2, 4) == [(2,)]
    for bad in ([4], [], "all", [-1]):
        with pytest.raises(ValueError):
            head_sets(bad, 4)


@pytest.mark.parametrize(
    ("fixture", "explicit"), [("tiny_llava", False), ("tiny_llava_next", False), ("tiny_llava", True)]
)
def test_all_heads_is_the_knockout_no_head_is_clean_and_fast_matches(
    fixture, explicit, request, tmp_path, monkeypatch
):
    """`explicit`: the non-fused attention path (what GPUs take), chunked masks and scores."""
    if explicit:
        monkeypatch.setattr(kernels, "FLASH_DTYPES", frozenset())
        monkeypatch.setattr(kernels, "SCORE_BUDGET", 100_000)
        monkeypatch.setattr(kernels, "MASK_BUDGET", 5_000)
    loaded = request.getfixturevalue(fixture)
    inputs, groups = prepared(loaded, tmp_path, 1)
    heads, n_layers = n_heads(loaded), loaded.n_layers
    rng = np.random.default_rng(2)
    jobs = []
    for source, target in (("image", "question"), ("question", "last")):
        edges = BlockEdges(groups.require(source), groups.require(target))
        layers = window_layers(int(rng.integers(n_layers)), 3, n_layers)
        chosen = tuple(sorted(rng.choice(heads, size=2, replace=False).tolist()))
        jobs += [
            KnockoutJob(edges, layers),  # today's knockout
            KnockoutJob(edges, layers, tuple(range(heads))),  # every head
            KnockoutJob(edges, layers, ()),  # no head
            KnockoutJob(edges, layers, (int(rng.integers(heads)),)),
            KnockoutJob(edges, layers, chosen),
        ]
    reference, fast = ReferenceEngine(loaded, "sdpa"), FastEngine(loaded, "sdpa")
    clean = reference.clean(inputs)
    ref = reference.run(clean, jobs)
    got = fast.run(fast.clean(inputs, first_target=int(groups.question.min())), jobs)
    assert fast.name == "fast"
    assert float((got.exp() - ref.exp()).abs().max()) <= TOLERANCE
    assert float((got - ref).abs().max()) <= LOGP_TOLERANCE
    for i in (0, 5):
        assert torch.equal(ref[i + 1], ref[i])  # every head == the knockout, bit for bit
        assert torch.equal(ref[i + 2], clean.logprobs) and torch.equal(got[i + 2], clean.logprobs)
        for j in (i + 3, i + 4):  # some heads: between nothing and everything, not equal to either
            assert (ref[j] - clean.logprobs).abs().max() > 1e-5 and (ref[j] - ref[i]).abs().max() > 1e-5


def test_one_head_matches_plain_implementation(tiny_llava_next, tmp_path):
    """GQA (4 query heads per KV head): block one query head in a plain from-scratch decoder."""
    loaded = tiny_llava_next
    inputs, groups = prepared(loaded, tmp_path, 3)
    heads, length, n_layers = n_heads(loaded), inputs.length, loaded.n_layers
    edges = BlockEdges(groups.image, groups.question)
    job = KnockoutJob(edges, window_layers(2, 3, n_layers), (heads - 1,))
    per_head = torch.zeros(heads, length, length, dtype=torch.bool)
    per_head[heads - 1] = edges.mask(torch.arange(length), length)
    with torch.no_grad():
        expected = plain_forward(loaded.model, _embeds(loaded, inputs), dict.fromkeys(job.layers, per_head))
    reference = ReferenceEngine(loaded, "sdpa")
    got = reference.run(reference.clean(inputs), [job])[0]
    assert float((got.exp() - expected.exp()).abs().max()) <= TOLERANCE


def test_each_head_cell_rows(tmp_path):
    loaded = get_model(model_config("tiny-llava"))
    heads, n_layers = n_heads(loaded), loaded.n_layers
    knockout = {"name": "question_to_last", "source": "question", "target": "last", "heads": "each"}
    config = cell_config(
        tmp_path, knockout=knockout, n_samples=1, engine={"name": "fast", "attention": "sdpa"}
    )
    outcome = run_cells(loaded, [config])[0]
    assert outcome.status == "done", outcome.error
    results = pd.read_parquet(tmp_path / outcome.cell_id / "results.parquet")
    assert len(results) == n_layers * heads and set(results["head"]) == set(range(heads))
    assert results.groupby("layer")["head"].apply(list).map(sorted).map(tuple).nunique() == 1
    curve = results.groupby(["layer", "head"])["rel_change_pct"].mean()
    assert outcome.summary["min_head"] == curve.idxmin()[1]
    assert outcome.summary["min_rel_change_pct"] == pytest.approx(curve.min())
    # a head set: one job per centre, the set recorded as text
    config["knockout"] = {**knockout, "heads": [0, 2]}
    outcome = run_cells(loaded, [config])[0]
    results = pd.read_parquet(tmp_path / outcome.cell_id / "results.parquet")
    assert len(results) == n_layers and set(results["heads"]) == {"0,2"}


def test_heads_null_keeps_the_cell_id(tmp_path):
    config = cell_config(tmp_path)
    with_null = {**config, "knockout": {**config["knockout"], "heads": None}}
    assert cell_id(canonical_config(with_null)) == cell_id(canonical_config(config))
    each = {**config, "knockout": {**config["knockout"], "heads": "each"}}
    assert cell_id(canonical_config(each)) != cell_id(canonical_config(config))
