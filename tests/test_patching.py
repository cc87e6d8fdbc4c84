"""Activation patching is exact: checked against a plain forward with the states substituted by hooks,
and against the four properties a restore must have (issue 18), for both patchers and both tiny models."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import cell_config, noise_sample

from mmflow.execution.runtime import run_cells
from mmflow.inputs.encode import encode
from mmflow.inputs.groups import build_token_groups
from mmflow.inputs.hooks import record_layer_inputs
from mmflow.knockout.reference import ReferenceEngine
from mmflow.knockout.spec import window_layers
from mmflow.patching.corrupt import embedding_std, make_corruption, pair_counterfactuals
from mmflow.patching.restore import FastPatcher, ReferencePatcher, RestoreJob

TOLERANCE = 1e-5  # max |p difference| over the vocabulary (float32), as for the fast knockout engine
LOGP_TOLERANCE = 1e-4


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def setup(loaded, tmp_path, seed: int, kind: str):
    """(inputs, groups, clean pass, corruption) for a random sample; sizes differ so NeXT must resize."""
    rng = np.random.default_rng(seed)
    sample = noise_sample(tmp_path, rng, size=(400, 300))
    other = noise_sample(tmp_path, rng, size=(300, 420), options=("full", "empty"))
    inputs = encode(loaded, sample)
    groups = build_token_groups(loaded, inputs, sample)
    sd = embedding_std(loaded, [sample, other]) if kind == "noise" else None
    corruption = make_corruption(loaded, kind, sample, inputs, groups.image, sd=sd, counterfactual=other)
    return inputs, groups, ReferenceEngine(loaded, "sdpa").clean(inputs), corruption


def plain_patch(loaded, embeds: torch.Tensor, attention_mask, states: torch.Tensor, job: RestoreJob | None):
    """The independent computation: the language model on `embeds` [T, D] (no vision tower, no mmflow
    hooks), with `states[j]` [T, D] written at the job's positions at the input of each window layer by
    plain forward pre-hooks. Returns (last-position log-probs [V], hidden states of every layer)."""
    layers = loaded.anatomy.layers
    handles = []
    for j in job.layers if job is not None else ():

        def hook(module, args, kwargs, j=j):
            hidden = args[0].clone()
            hidden[0, job.positions] = states[j, job.positions]
            return (hidden, *args[1:]), kwargs

        handles.append(layers[j].register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            out = loaded.model(
                inputs_embeds=embeds[None], attention_mask=attention_mask, output_hidden_states=True
            )
    finally:
        for handle in handles:
            handle.remove()
    return torch.log_softmax(out.logits[0, -1].float(), -1), out.hidden_states


def plain_states(loaded, inputs) -> torch.Tensor:
    """Every layer's input [L, T, D] of a clean forward, from transformers' own hidden_states."""
    with torch.no_grad():
        out = loaded.model(**inputs.tensors, output_hidden_states=True)
    return torch.stack([h[0] for h in out.hidden_states[: len(loaded.anatomy.layers)]])


def assert_close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert float((a.exp() - b.exp()).abs().max()) <= TOLERANCE
    assert float((a - b).abs().max()) <= LOGP_TOLERANCE


@pytest.mark.parametrize(
    ("fixture", "kind"), [("tiny_llava", "noise"), ("tiny_llava_next", "counterfactual")]
)
def test_reference_patcher_matches_plain_forward_with_hooks(fixture, kind, request, tmp_path):
    loaded = request.getfixturevalue(fixture)
    inputs, groups, clean, corruption = setup(loaded, tmp_path, 1, kind)
    clean_states = plain_states(loaded, inputs)
    embeds = plain_states(loaded, corruption.inputs)[0]  # the corrupted run's input embeddings
    if corruption.noise is not None:
        embeds = embeds.clone()
        embeds[corruption.positions] += corruption.noise
    n_layers, rng = loaded.n_layers, np.random.default_rng(2)
    jobs = [
        RestoreJob(groups.question, window_layers(int(rng.integers(n_layers)), 3, n_layers)),
        RestoreJob(groups.image[::3], window_layers(int(rng.integers(1, n_layers)), 1, n_layers)),
    ]
    patcher = ReferencePatcher(loaded, "sdpa")
    corrupted = patcher.corrupted(corruption, 0)
    got = patcher.restore(corrupted, patcher.clean_states(clean, 0), jobs)
    mask = inputs.tensors["attention_mask"]
    assert_close(corrupted.logprobs, plain_patch(loaded, embeds, mask, clean_states, None)[0])
    for job, row in zip(jobs, got, strict=True):
        assert_close(row, plain_patch(loaded, embeds, mask, clean_states, job)[0])
    assert (got - corrupted.logprobs).abs().max() > 1e-3  # the restores do change the output


@pytest.mark.parametrize(("fixture", "kind"), [("tiny_llava", "noise"), ("tiny_llava_next", "noise")])
def test_the_four_exactness_properties(fixture, kind, request, tmp_path):
    """Nothing restored = corrupted; all positions at layer 0 = clean; noise: the image group in a
    window holding layer 0 = clean; positions before the first restored one are unchanged."""
    loaded = request.getfixturevalue(fixture)
    inputs, groups, clean, corruption = setup(loaded, tmp_path, 3, kind)
    n_layers, length = loaded.n_layers, inputs.length
    reference, fast = ReferencePatcher(loaded, "sdpa"), FastPatcher(loaded, "sdpa")
    corrupted_ref = reference.corrupted(corruption, 0)
    corrupted_fast = fast.corrupted(corruption, 0)
    assert torch.equal(corrupted_ref.logprobs, corrupted_fast.logprobs)
    assert (corrupted_ref.logprobs - clean.logprobs).abs().max() > 1e-2  # the corruption matters
    states = reference.clean_states(clean, 0)
    jobs = [
        RestoreJob(torch.empty(0, dtype=torch.long), range(n_layers)),  # nothing
        RestoreJob(groups.question, range(n_layers, n_layers)),  # no layer
        RestoreJob(torch.arange(length), range(0, 1)),  # every position at layer 0
        RestoreJob(groups.image, window_layers(0, 3, n_layers)),  # image group, window holding layer 0
        RestoreJob(groups.image, range(n_layers)),
    ]
    fast_states = fast.clean_states(clean, 0)  # with the clean keys/values: the covering shortcut
    runs = (
        (reference, corrupted_ref, states),
        (fast, corrupted_fast, states),
        (fast, corrupted_fast, fast_states),
    )
    for patcher, corrupted, clean_states in runs:
        out = patcher.restore(corrupted, clean_states, jobs)
        assert torch.equal(out[0], corrupted.logprobs) and torch.equal(out[1], corrupted.logprobs)
        for row in out[2:]:
            assert_close(row, clean.logprobs)
    assert fast.name == "fast"
    # positions before the first restored one: every layer's input equal to the corrupted run's
    corrupted_states = reference.states(corruption.inputs, 0, corruption)
    first = int(groups.question.min())
    job = RestoreJob(groups.question, window_layers(n_layers // 2, 3, n_layers))
    with record_layer_inputs(loaded.anatomy.layers, 0) as record:
        patched = reference.last_logprobs(corruption, job, states.hidden, 0)
    patched_states = torch.stack(record["inputs"])
    assert torch.equal(patched_states[:, :first], corrupted_states[:, :first])
    assert (patched_states[:, first:] - corrupted_states[:, first:]).abs().max() > 1e-3
    assert (patched - corrupted_ref.logprobs).abs().max() > 1e-4


def test_fast_patcher_matches_reference_on_random_jobs(tiny_llava, tmp_path, monkeypatch):
    loaded = tiny_llava
    caches, run = [], FastPatcher._run
    monkeypatch.setattr(
        FastPatcher, "_run", lambda self, cache, *a: caches.append(cache) or run(self, cache, *a)
    )
    for seed, kind in ((5, "blank"), (6, "counterfactual")):
        inputs, groups, clean, corruption = setup(loaded, tmp_path, seed, kind)
        rng = np.random.default_rng(seed)
        length, n_layers = inputs.length, loaded.n_layers
        jobs = [RestoreJob(groups.image, window_layers(c, 3, n_layers)) for c in range(0, n_layers, 3)] + [
            RestoreJob(groups.last, window_layers(n_layers - 1, 1, n_layers))
        ]
        for _ in range(4):  # arbitrary position sets and windows
            count = int(rng.integers(1, 40))
            positions = torch.tensor(sorted(rng.choice(length, size=count, replace=False)))
            centre, width = int(rng.integers(n_layers)), int(rng.integers(1, n_layers + 1))
            jobs.append(RestoreJob(positions, window_layers(centre, width, n_layers)))
        start = min(int(job.positions.min()) for job in jobs)
        reference, fast = ReferencePatcher(loaded, "sdpa"), FastPatcher(loaded, "sdpa")
        states = reference.clean_states(clean, start)
        ref = reference.restore(reference.corrupted(corruption, start), states, jobs)
        corrupted = fast.corrupted(corruption, start)
        caches.clear()
        for clean_states in (states, fast.clean_states(clean, start)):  # without / with clean K/V
            assert_close(fast.restore(corrupted, clean_states, jobs), ref)
        assert fast.name == "fast"
        assert (ref - ref[0]).abs().max() > 1e-3
        # the image jobs took the covering shortcut (rows after the image, over the clean K/V)
        assert [cache is corrupted.cache for cache in caches] == [True, True, False]


def test_counterfactual_pairs_are_deterministic_and_differ_in_answer(tmp_path):
    rng = np.random.default_rng(0)
    samples = [
        noise_sample(tmp_path, rng, options=opts) for opts in [("empty", "full")] * 2 + [("full", "x")]
    ]
    pairs = pair_counterfactuals(samples)
    assert {k: v.question_id for k, v in pairs.items()} == {
        samples[0].question_id: samples[2].question_id,
        samples[1].question_id: samples[2].question_id,
        samples[2].question_id: samples[0].question_id,
    }
    assert pair_counterfactuals(samples[:2]) == {}


def _run(tmp_path, **changes) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    config = cell_config(tmp_path, analysis="patching", window=3, n_samples=4, **changes)
    outcome = run_cells(_loaded(), [config])[0]
    assert outcome.status == "done", outcome.error
    folder = tmp_path / outcome.cell_id
    return pd.read_parquet(folder / "samples.parquet"), pd.read_parquet(folder / "results.parquet"), folder


def _loaded():
    from conftest import model_config

    from mmflow.models.registry import get_model

    return get_model(model_config("tiny-llava"))


def test_patching_cell_rows_and_skips(tmp_path):
    patching = {"groups": ["image", "question+last"], "noise_scale": 3.0, "margin": 0.0}
    changes = dict(
        corruption="counterfactual", patching=patching, engine={"name": "fast", "attention": "sdpa"}
    )
    samples, results, _ = _run(tmp_path / "a", **changes)
    scored = samples[samples["status"] == "scored"]
    assert len(scored) >= 1 and len(results) == len(scored) * 2 * 8
    assert list(results["group"].unique()) == ["image", "question+last"]
    merged = results.merge(scored[["question_id", "p_base"]], on="question_id")
    assert np.allclose(merged["p_clean"], merged["p_base"], rtol=1e-6)
    expected = (results["p_patched"] - results["p_corrupt"]) / (results["p_clean"] - results["p_corrupt"])
    assert np.allclose(results["recovered_frac"], expected)
    assert (results["p_clean"] > results["p_corrupt"]).all()
    assert np.allclose(results["logp_patched_change"], np.log(results["p_patched"] / results["p_corrupt"]))
    assert results["corrupt_source"].str.len().gt(0).all()
    # a margin no corruption can reach: every sample skipped with the reason
    changes["patching"] = {**patching, "margin": 1.0}
    samples, results, _ = _run(tmp_path / "c", **changes)
    assert len(results) == 0 and set(samples["skip_reason"]) == {"corruption_too_weak"}
    assert len(samples) == 4


def test_toy_llava_patching_and_head_knockouts_are_exact(tmp_path):
    """The trained toy model: fast == reference for every group x centre and every head, image restored
    from layer 0 == clean, all heads == the knockout."""
    from conftest import model_config

    from mmflow.data import load_shapes
    from mmflow.knockout.fast import FastEngine
    from mmflow.knockout.spec import BlockEdges, KnockoutJob
    from mmflow.models.registry import get_model

    loaded = get_model(model_config("toy-llava"))
    (sample,) = load_shapes("ChooseAttr", 1, seed=0, cache_dir=tmp_path)
    inputs = encode(loaded, sample)
    groups = build_token_groups(loaded, inputs, sample)
    sd = embedding_std(loaded, [sample])
    corruption = make_corruption(loaded, "noise", sample, inputs, groups.image, sd=sd)
    n_layers, start = loaded.n_layers, int(groups.image.min())
    jobs = [
        RestoreJob(groups.get(g), window_layers(c, 2, n_layers))
        for g in ("image", "question", "last")
        for c in range(n_layers)
    ]
    reference, fast = ReferencePatcher(loaded, "sdpa"), FastPatcher(loaded, "sdpa")
    clean = fast.clean(inputs, first_target=start)
    ref = reference.restore(
        reference.corrupted(corruption, start), reference.clean_states(clean, start), jobs
    )
    corrupted = fast.corrupted(corruption, start)
    got = fast.restore(corrupted, fast.clean_states(clean, start), jobs)
    assert_close(got, ref)
    assert (corrupted.logprobs - clean.logprobs).abs().max() > 1e-2  # the noise matters
    assert (got - corrupted.logprobs).abs().max() > 1e-2  # and restoring does
    assert_close(ref[0], clean.logprobs)  # image restored in a window holding layer 0

    heads = loaded.model.config.get_text_config().num_attention_heads
    edges = BlockEdges(groups.image, groups.last)
    layers = window_layers(4, 2, n_layers)
    head_jobs = [KnockoutJob(edges, layers, (h,)) for h in range(heads)] + [
        KnockoutJob(edges, layers, tuple(range(heads))),
        KnockoutJob(edges, layers),
    ]
    engine = FastEngine(loaded, "sdpa")
    ref_heads = ReferenceEngine(loaded, "sdpa").run(clean, head_jobs)
    assert_close(engine.run(engine.clean(inputs, first_target=start), head_jobs), ref_heads)
    assert torch.equal(ref_heads[-1], ref_heads[-2])
