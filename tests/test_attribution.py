"""The attribution screen: its gradient against finite differences, the QK-corrected estimate exact where
the model is linear after the head, verification rows equal to a separate exact per-head knockout cell,
and the agreement numbers."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import cell_config, noise_sample

from mmflow.analyses import analysis_for
from mmflow.analyses.attribution_agreement import agreement
from mmflow.config.validate import validate_cell
from mmflow.errors import CellConfigError
from mmflow.execution.runtime import run_cells
from mmflow.inputs.encode import encode
from mmflow.inputs.groups import build_token_groups
from mmflow.knockout.attribution import (
    LayerState,
    answer_gradients,
    answer_gradients_batch,
    head_estimates,
    layer_head_estimates,
    source_estimates,
    window_sum,
)
from mmflow.knockout.reference import ReferenceEngine
from mmflow.knockout.spec import BlockEdges, KnockoutJob


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_gradient_matches_finite_differences(tiny_llava, tmp_path):
    """d log p / d head output, along a random direction at the targets, vs a central difference."""
    loaded = tiny_llava
    sample = noise_sample(tmp_path, np.random.default_rng(0), size=(400, 300))
    inputs = encode(loaded, sample)
    groups = build_token_groups(loaded, inputs, sample)
    token = int(ReferenceEngine(loaded, "sdpa").clean(inputs).top1)
    gradients = answer_gradients(loaded, inputs, token)
    targets = torch.cat([groups.question, groups.last])
    generator = torch.Generator().manual_seed(1)
    for layer in (1, loaded.n_layers - 2):
        grad = gradients.layers[layer].grad  # [H, T, d]
        direction = torch.zeros_like(grad)
        direction[:, targets] = torch.randn(grad.shape[0], len(targets), grad.shape[-1], generator=generator)
        expected = float((grad * direction).sum())
        flat = direction.transpose(0, 1).flatten(1)  # [T, H*d], the layout o_proj reads

        def logp(eps, layer=layer, flat=flat):
            o_proj = loaded.anatomy.layers[layer].self_attn.o_proj
            handle = o_proj.register_forward_pre_hook(lambda m, args: (args[0] + eps * flat,))
            try:
                with torch.no_grad():
                    out = loaded.model(**inputs.tensors, use_cache=False, logits_to_keep=1)
            finally:
                handle.remove()
            return float(torch.log_softmax(out.logits[0, -1].double(), -1)[token])

        eps = 1e-2
        numeric = (logp(eps) - logp(-eps)) / (2 * eps)
        assert abs(expected) > 1e-2
        assert numeric == pytest.approx(expected, rel=5e-3)
    assert gradients.logp == pytest.approx(logp(0.0), abs=1e-5)


def _attention_output(query, key, value, mask, scaling):
    weights = torch.softmax(query @ key.transpose(-1, -2) * scaling + mask, dim=-1)
    return weights @ value


def test_corrected_estimate_is_exact_when_linear_after_the_head():
    """A head whose output feeds a linear readout f(O) = <W, O>: the gradient is W everywhere, and the
    QK-corrected estimate of blocking sources (as a group, or one token at a time) equals the exact
    change of f, however saturated the softmax."""
    torch.manual_seed(0)
    heads, kv_heads, length, dim = 4, 2, 9, 5
    query = torch.randn(heads, length, dim, dtype=torch.float64) * 3  # large logits: a saturated softmax
    key = torch.randn(kv_heads, length, dim, dtype=torch.float64) * 3
    value = torch.randn(kv_heads, length, dim, dtype=torch.float64)
    causal = torch.full((length, length), float("-inf"), dtype=torch.float64).triu(1)
    readout = torch.randn(heads, length, dim, dtype=torch.float64)
    state = LayerState(query, key, value, causal, 0.7, readout)
    sources, targets = torch.tensor([1, 2, 4]), torch.tensor([5, 6, 8])
    full_key, full_value = key.repeat_interleave(2, 0), value.repeat_interleave(2, 0)

    def exact(blocked_sources):
        mask = causal.clone()
        mask[targets[:, None], blocked_sources[None, :]] = float("-inf")
        clean = _attention_output(query, full_key, full_value, causal, 0.7)
        new = _attention_output(query, full_key, full_value, mask, 0.7)
        return ((new - clean) * readout).sum(dim=(1, 2))  # per head: the others' outputs do not change

    estimate = head_estimates(state, sources, targets)
    assert torch.allclose(estimate.double(), exact(sources), atol=1e-5, rtol=1e-4)
    assert exact(sources).abs().max() > 0.1
    per_source = source_estimates(state, sources, targets)  # [H, S]
    for column, source in enumerate(sources):
        assert torch.allclose(per_source[:, column].double(), exact(source[None]), atol=1e-5, rtol=1e-4)


def test_window_sum():
    per_layer = torch.arange(12.0).view(4, 3)
    got = window_sum(per_layer, [range(0, 2), range(1, 4)])
    assert torch.equal(got, torch.stack([per_layer[:2].sum(0), per_layer[1:].sum(0)]))


def attribution_config(tmp_path, **attribution):
    knockout = {"name": "image_to_question", "source": "image", "target": "question"}
    settings = {"sources": "group", "top_k": 3, "controls": 2, "seed": 0, **attribution}
    config = cell_config(
        tmp_path, analysis="attribution", knockout=knockout, window=1, n_samples=2, attribution=settings
    )
    config["engine"] = {"name": "fast", "attention": "sdpa"}
    config.pop("seed")
    return config


def test_verification_rows_equal_a_separate_exact_per_head_cell(tiny_llava, tmp_path):
    loaded = tiny_llava
    heads = loaded.model.config.get_text_config().num_attention_heads
    config = attribution_config(tmp_path)
    outcome = run_cells(loaded, [config])[0]
    assert outcome.status == "done", outcome.error
    rows = pd.read_parquet(tmp_path / outcome.cell_id / "results.parquet")
    assert len(rows) == 2 * loaded.n_layers * heads
    for _, sample in rows.groupby("question_id"):
        assert sample["verified"].sum() == 5 and sample["top_k"].sum() == 3 and sample["control"].sum() == 2
        assert not (sample["top_k"] & sample["control"]).any()
        top = sample["estimate"].abs().nlargest(3).index
        assert sample.loc[top, "top_k"].all()
        assert sample.loc[~sample["verified"], "exact"].isna().all()
    exact_config = cell_config(tmp_path, window=1, n_samples=2, engine={"name": "fast", "attention": "sdpa"})
    exact_config["knockout"] = {**config["knockout"], "heads": "each"}
    exact_outcome = run_cells(loaded, [exact_config])[0]
    assert exact_outcome.status == "done", exact_outcome.error
    exact = pd.read_parquet(tmp_path / exact_outcome.cell_id / "results.parquet")
    merged = rows[rows["verified"]].merge(exact, on=["question_id", "layer", "head"])
    assert len(merged) == 10
    assert np.allclose(merged["exact"], merged["logp_change"], atol=1e-5)
    headline = outcome.summary
    assert set(headline) >= {"spearman", "recall_at_k", "control_fn_rate", "n_verified", "min_head"}
    assert headline["n_verified"] == 10 and 0.0 <= headline["recall_at_k"] <= 1.0
    # the report: the estimate map (verified cells outlined) beside the exact per-head map, agreement in
    # the caption; W&B's per-layer table reads the same curve
    from mmflow.report import build_report
    from mmflow.wandb_logger import per_layer_table

    html = build_report(tmp_path).read_text()
    assert "Attribution screen" in html and f"Spearman {headline['spearman']:.2f}" in html
    assert "figures/attribution" in html
    table = per_layer_table(analysis_for(config), rows, loaded.n_layers)
    assert len(table) == loaded.n_layers


def test_patch_sources_verify_against_the_reference_engine(tiny_llava, tmp_path):
    loaded = tiny_llava
    config = attribution_config(tmp_path, sources="patches", top_k=2, controls=2)
    config["n_samples"] = 1
    outcome = run_cells(loaded, [config])[0]
    assert outcome.status == "done", outcome.error
    rows = pd.read_parquet(tmp_path / outcome.cell_id / "results.parquet")
    heads = loaded.model.config.get_text_config().num_attention_heads
    from mmflow.data import load_shapes

    sample = load_shapes("ChooseAttr", 1, seed=0, cache_dir=str(tmp_path / "shapes"))[0]
    inputs = encode(loaded, sample)
    groups = build_token_groups(loaded, inputs, sample)
    assert len(rows) == loaded.n_layers * heads * len(groups.image)
    assert set(rows["source"]) == set(range(len(groups.image)))
    # recompute the verified rows with the reference engine, one full forward each
    reference = ReferenceEngine(loaded, "sdpa")
    clean = reference.clean(inputs)
    token = clean.top1
    verified = rows[rows["verified"]]
    jobs = [
        KnockoutJob(BlockEdges(groups.image[[s]], groups.question), range(layer, layer + 1), (head,))
        for layer, head, s in verified[["layer", "head", "source"]].itertuples(index=False)
    ]
    expected = reference.run(clean, jobs)[:, token] - clean.logprobs[token]
    assert np.allclose(verified["exact"].to_numpy(), expected.numpy(), atol=1e-5)
    # the estimates are those of the per-source formula on the same gradients
    gradients = answer_gradients(loaded, inputs, token)
    per_layer = layer_head_estimates(gradients, groups.image, groups.question, patches=True)
    got = rows.sort_values(["layer", "head", "source"])["estimate"].to_numpy()
    assert np.allclose(got, per_layer.flatten().numpy(), atol=1e-6)


def test_agreement_numbers():
    rows = pd.DataFrame(
        {
            "question_id": ["a"] * 6,
            "estimate": [-5.0, -4.0, -0.1, 0.0, 0.2, 0.05],
            "exact": [-6.0, -1.0, -3.0, np.nan, -0.1, np.nan],
            "verified": [True, True, True, False, True, False],
            "top_k": [True, True, False, False, False, False],
            "control": [False, False, True, False, True, False],
        }
    )
    got = agreement(rows, k=2)
    # exact top 2 by |exact|: rows 0 and 2; the estimate's top 2: rows 0 and 1 -> recall 1/2
    assert got["recall_at_k"] == 0.5
    # controls: row 2 (|exact| 3 >= cut 3) is a false negative, row 4 is not
    assert got["control_fn_rate"] == 0.5 and got["n_controls"] == 2 and got["n_verified"] == 4
    assert got["spearman"] == pytest.approx(0.8)  # ranks 1,2,3,4 vs 1,3,2,4: 1 - 6*2/(4*15)
    assert agreement(rows.assign(verified=False), k=2) == {"n_verified": 0}


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"sources": "tokens"}, "attribution.sources"),
        ({"top_k": 0}, "attribution.top_k"),
        ({"controls": -1}, "attribution.controls"),
    ],
)
def test_bad_attribution_settings_name_the_key(tmp_path, change, key):
    with pytest.raises(CellConfigError, match=key):
        validate_cell(attribution_config(tmp_path, **change))


def test_patches_need_an_image_source(tmp_path):
    config = attribution_config(tmp_path, sources="patches")
    config["knockout"] = {"name": "question_to_last", "source": "question", "target": "last"}
    with pytest.raises(CellConfigError, match="image source"):
        validate_cell(config)


def test_suffix_run_gives_the_full_runs_gradients(tiny_llava, tmp_path):
    """From a fast clean pass, only positions from the first target on run with gradients: same
    log p, same head-output gradients and estimates at the targets as the whole-sequence run."""
    from mmflow.knockout.fast import FastEngine

    loaded = tiny_llava
    sample = noise_sample(tmp_path, np.random.default_rng(4), size=(400, 300))
    inputs = encode(loaded, sample)
    groups = build_token_groups(loaded, inputs, sample)
    start = int(groups.question.min())
    clean = FastEngine(loaded, "sdpa").clean(inputs, first_target=start)
    suffix = answer_gradients(loaded, inputs, clean.top1, clean)
    full = answer_gradients(loaded, inputs, clean.top1)
    assert suffix.layers[0].offset == start and full.layers[0].offset == 0
    assert suffix.layers[0].query.shape[1] == inputs.length - start
    assert suffix.logp == pytest.approx(full.logp, abs=1e-5)
    for a, b in zip(suffix.layers, full.layers, strict=True):
        assert torch.allclose(a.grad, b.grad[:, start:], atol=1e-5, rtol=1e-4)
    for patches in (False, True):
        got = layer_head_estimates(suffix, groups.image, groups.question, patches)
        want = layer_head_estimates(full, groups.image, groups.question, patches)
        assert torch.allclose(got, want, atol=1e-6, rtol=1e-4)


def test_batched_gradients_equal_the_per_sample_ones(tiny_llava, tmp_path):
    """Several samples' suffix runs in one padded forward + backward (different suffix lengths and
    different first positions, so both the prefix caches and the suffixes are padded), plus one sample
    with no fast clean pass (its whole sequence, alone): each equals its own `answer_gradients`."""
    from mmflow.knockout.fast import FastEngine

    loaded = tiny_llava
    engine = FastEngine(loaded, "sdpa")
    rng = np.random.default_rng(7)
    questions = ["Is the jar full or empty?", "What colour is the small round object on the left side?"]
    items, groups_of = [], []
    for index, question in enumerate(questions * 2):
        sample = noise_sample(tmp_path, rng, size=(400, 300), question=question)
        inputs = encode(loaded, sample)
        groups = build_token_groups(loaded, inputs, sample)
        first = int((groups.question if index < 2 else groups.last).min())
        clean = engine.clean(inputs, first_target=first) if index < 3 else None
        token = int(ReferenceEngine(loaded, "sdpa").clean(inputs).top1)
        items.append((inputs, token, clean))
        groups_of.append(groups)
    assert len({inputs.length for inputs, _, _ in items}) == 2
    assert len({clean.first_target for _, _, clean in items[:3]}) == 2
    batched = answer_gradients_batch(loaded, items)
    for (inputs, token, clean), got, groups in zip(items, batched, groups_of, strict=True):
        alone = answer_gradients(loaded, inputs, token, clean)
        assert got.token_id == token and got.logp == pytest.approx(alone.logp, abs=1e-5)
        for a, b in zip(got.layers, alone.layers, strict=True):
            assert a.offset == b.offset and a.query.shape == b.query.shape and a.key.shape == b.key.shape
            for name in ("query", "key", "value", "mask", "grad"):
                assert torch.allclose(getattr(a, name), getattr(b, name), atol=1e-5, rtol=1e-4), name
        assert got.layers[0].offset == (0 if clean is None else clean.first_target)
        targets = groups.last if got.layers[0].offset > int(groups.question.min()) else groups.question
        want = layer_head_estimates(alone, groups.image, targets)
        assert torch.allclose(layer_head_estimates(got, groups.image, targets), want, atol=1e-6, rtol=1e-4)
        assert want.abs().max() > 1e-4


def test_a_failed_suffix_check_runs_everything_and_shares_its_dithered_pass(tiny_llava, tmp_path):
    """A suffix run that misses the clean log p (here: the cached prefix keys perturbed, so it attends
    to the wrong keys) falls back to the whole sequence; the check's dithered forward stays on the clean pass
    for the engine (noise floor, probe) to reuse; the parameters still require gradients afterwards."""
    from mmflow.knockout.fast import FastEngine
    from mmflow.knockout.noise import dithered_logprobs

    loaded = tiny_llava
    sample = noise_sample(tmp_path, np.random.default_rng(11), size=(400, 300))
    inputs = encode(loaded, sample)
    groups = build_token_groups(loaded, inputs, sample)
    engine = FastEngine(loaded, "sdpa")
    clean = engine.clean(inputs, first_target=int(groups.question.min()))
    token = clean.top1
    generator = torch.Generator().manual_seed(0)
    clean.keys = [key + torch.randn(key.shape, generator=generator) for key in clean.keys]
    before = [p.requires_grad for p in loaded.model.parameters()]
    got = answer_gradients(loaded, inputs, token, clean)
    assert got.layers[0].offset == 0 and got.layers[0].query.shape[1] == inputs.length
    assert [p.requires_grad for p in loaded.model.parameters()] == before and any(before)
    assert clean.dithered is not None and engine.dithered(clean) is clean.dithered
    assert torch.equal(clean.dithered, dithered_logprobs(loaded, inputs))


@pytest.mark.slow
def test_benchmark_prints_one_json_line(capsys):
    from mmflow.bench.engine import main

    summary = main(
        ["--analysis", "attribution", "--layers", "2", "--hidden", "64", "--heads", "4", "--samples", "1"]
        + ["--toy-samples", "1", "--repeats", "1", "--threads", "1", "--top-k", "2"]
    )
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last) == json.loads(json.dumps(summary))
    for part in (summary["toy"], summary["llava-1.5"]):
        assert part["speedup"] > 0 and -1.0 <= part["spearman_pooled"] <= 1.0
    assert summary["llava-1.5"]["heads"] == 4 and summary["toy"]["heads"] == 4


def test_the_config_composes_and_validates():
    from test_analyses import compose

    config = compose(["analysis=attribution", "knockout=image_to_last", "attribution.sources=patches"])
    assert config["window"] == 1 and config["knockout"]["target"] == "last"
    assert config["attribution"] == {"sources": "patches", "top_k": 5, "controls": 5, "seed": 0}
    assert "lens" not in config and "seed" not in config
    validate_cell(config)
    labels = analysis_for(config).labels
    assert labels.variant == "attribution_image_to_last" and "per head and source token" in labels.legend
