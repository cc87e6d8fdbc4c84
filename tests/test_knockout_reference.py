"""The reference knockout is exactly docs/method.md's: checked against a plain re-implementation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import model_config, noise_sample

from mmflow.config.spec import ModelSpec
from mmflow.inputs.encode import encode
from mmflow.inputs.groups import build_token_groups
from mmflow.inputs.hooks import record_layer_inputs
from mmflow.knockout.attention import check_prepared
from mmflow.knockout.reference import ReferenceEngine
from mmflow.knockout.spec import BlockEdges, KnockoutJob, window_layers
from mmflow.models.registry import load_model


def test_window_formula():
    assert list(window_layers(0, 7, 32)) == [0, 1, 2, 3]
    assert list(window_layers(10, 7, 32)) == list(range(7, 14))
    assert list(window_layers(31, 7, 32)) == [28, 29, 30, 31]
    assert list(window_layers(5, 1, 8)) == [5]
    assert list(window_layers(4, 4, 8)) == [2, 3, 4, 5]  # even width: floor(k/2) below, ceil(k/2) above
    for width in range(1, 12):
        for centre in range(9):
            layers = window_layers(centre, width, 9)
            assert centre in layers and len(layers) <= width
    with pytest.raises(ValueError):
        window_layers(8, 3, 8)


def _rms(x, norm):
    variance = x.pow(2).mean(-1, keepdim=True)
    return norm.weight * (x * torch.rsqrt(variance + norm.variance_epsilon))


def _rotate(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def plain_forward(model, embeds: torch.Tensor, blocked: dict[int, torch.Tensor]) -> torch.Tensor:
    """A from-scratch Llama decoder: causal mask, -inf on `blocked[layer]` [T, T], float32 softmax."""
    lm = model.model.language_model
    cfg = lm.config
    length = embeds.shape[0]
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    groups = cfg.num_attention_heads // cfg.num_key_value_heads
    cos, sin = lm.rotary_emb(embeds[None], torch.arange(length)[None])
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    x = embeds
    for index, layer in enumerate(lm.layers):
        attn = layer.self_attn
        h = _rms(x, layer.input_layernorm)
        q = attn.q_proj(h).view(length, -1, head_dim).transpose(0, 1)
        k = attn.k_proj(h).view(length, -1, head_dim).transpose(0, 1)
        v = attn.v_proj(h).view(length, -1, head_dim).transpose(0, 1)
        q, k = q * cos + _rotate(q) * sin, k * cos + _rotate(k) * sin
        k, v = k.repeat_interleave(groups, 0), v.repeat_interleave(groups, 0)
        scores = q @ k.transpose(1, 2) / head_dim**0.5
        allowed = causal & ~blocked.get(index, torch.zeros_like(causal))
        scores = scores.masked_fill(~allowed, float("-inf"))
        out = torch.softmax(scores.float(), dim=-1) @ v
        x = x + attn.o_proj(out.transpose(0, 1).reshape(length, -1))
        x = x + layer.mlp(_rms(x, layer.post_attention_layernorm))
    logits = model.lm_head(_rms(x[-1], lm.norm))
    return torch.log_softmax(logits.float(), dim=-1)


def _embeds(loaded, inputs) -> torch.Tensor:
    """The language model's input (text embeddings with image features merged), from the model itself."""
    with record_layer_inputs(loaded.anatomy.layers[:1], start=0) as record:
        ReferenceEngine(loaded, "sdpa").clean(inputs)
    return record["inputs"][0]


@pytest.mark.parametrize("fixture", ["tiny_llava", "tiny_llava_next"])
def test_reference_matches_plain_implementation_on_random_inputs(fixture, request, tmp_path):
    loaded = request.getfixturevalue(fixture)
    rng = np.random.default_rng(123)
    engine = ReferenceEngine(loaded, "sdpa")
    for _ in range(2):
        sample = noise_sample(tmp_path, rng, size=(int(rng.integers(200, 700)), int(rng.integers(200, 700))))
        inputs = encode(loaded, sample)
        length = inputs.length
        embeds = _embeds(loaded, inputs)
        torch.testing.assert_close(
            _run_plain(loaded, embeds, {}), engine.clean(inputs).logprobs, atol=2e-5, rtol=0
        )
        for _ in range(3):  # random edges: any positions, sources may follow targets
            sources = torch.tensor(
                sorted(rng.choice(length - 1, size=int(rng.integers(1, 50)), replace=False))
            )
            targets = torch.tensor(
                sorted(rng.choice(np.arange(1, length), size=int(rng.integers(1, 20)), replace=False))
            )
            edges = BlockEdges(sources, targets)
            centre, width = int(rng.integers(0, loaded.n_layers)), int(rng.integers(1, loaded.n_layers + 1))
            job = KnockoutJob(edges, window_layers(centre, width, loaded.n_layers))
            mask = edges.mask(torch.arange(length), length)
            plain = _run_plain(loaded, embeds, {layer: mask for layer in job.layers})
            torch.testing.assert_close(engine.run(engine.clean(inputs), [job])[0], plain, atol=2e-5, rtol=0)


def _run_plain(loaded, embeds, blocked):
    with torch.no_grad():
        return plain_forward(loaded.model, embeds, blocked)


@pytest.fixture(scope="module")
def eager_llava():
    from mmflow.knockout import make_engine

    loaded = load_model(ModelSpec.from_mapping(model_config("tiny-llava")))
    make_engine("reference", loaded, "eager")  # the engine routes attention through mmflow_eager
    return loaded


def _sample_and_groups(loaded, tmp_path, seed=7):
    sample = noise_sample(tmp_path, np.random.default_rng(seed))
    inputs = encode(loaded, sample)
    return inputs, build_token_groups(loaded, inputs, sample)


def test_empty_knockout_is_exactly_clean(tiny_llava, tmp_path):
    inputs, groups = _sample_and_groups(tiny_llava, tmp_path)
    engine = ReferenceEngine(tiny_llava, "sdpa")
    clean = engine.clean(inputs)
    empty_edges = BlockEdges(torch.empty(0, dtype=torch.long), groups.question)
    jobs = [
        KnockoutJob(BlockEdges(groups.image, groups.question), range(0)),
        KnockoutJob(empty_edges, range(tiny_llava.n_layers)),
    ]
    for row in engine.run(clean, jobs):
        assert torch.equal(row, clean.logprobs)


def _record(loaded, inputs, job):
    """Attention weights [layer] and residual-stream inputs [layer] of the language model under `job`."""
    from mmflow.knockout.attention import blocking

    weights, hidden, handles = {}, {}, []
    for index, layer in enumerate(loaded.anatomy.layers):
        handles.append(
            layer.self_attn.register_forward_hook(lambda m, a, o, i=index: weights.__setitem__(i, o[1]))
        )
        handles.append(
            layer.register_forward_pre_hook(
                lambda m, a, k, i=index: hidden.__setitem__(i, (a or (k["hidden_states"],))[0]),
                with_kwargs=True,
            )
        )
    projector = {}
    handles.append(
        loaded.model.model.multi_modal_projector.register_forward_hook(
            lambda m, a, o: projector.setdefault("x", o)
        )
    )
    with torch.no_grad(), blocking(job):
        loaded.model(**inputs.tensors)
    for handle in handles:
        handle.remove()
    return weights, hidden, projector["x"]


def test_blocked_weights_are_zero_and_only_inside_the_window(eager_llava, tmp_path):
    inputs, groups = _sample_and_groups(eager_llava, tmp_path)
    job = KnockoutJob(BlockEdges(groups.image, groups.question), window_layers(4, 3, eager_llava.n_layers))
    weights, _, _ = _record(eager_llava, inputs, job)
    rows, cols = groups.question[:, None], groups.image[None, :]
    for layer, w in weights.items():
        block = w[0][:, rows, cols]  # [heads, n_question, n_image]
        if layer in job.layers:
            assert torch.count_nonzero(block) == 0
            assert torch.allclose(w[0].sum(-1), torch.ones(()), atol=1e-5)  # still a distribution
        else:
            assert (block > 0).all()


def test_positions_before_first_target_and_vision_tower_unchanged(eager_llava, tmp_path):
    inputs, groups = _sample_and_groups(eager_llava, tmp_path)
    clean_w, clean_h, clean_img = _record(eager_llava, inputs, None)
    job = KnockoutJob(BlockEdges(groups.image, groups.question), range(2, 5))
    w, h, img = _record(eager_llava, inputs, job)
    first = int(groups.question.min())
    assert torch.equal(img, clean_img)
    for layer in range(eager_llava.n_layers):
        assert torch.equal(h[layer][:, :first], clean_h[layer][:, :first])
        changed = not torch.equal(h[layer][:, first:], clean_h[layer][:, first:])
        assert changed == (layer >= 3)  # the input of layer 3 is the first one after a blocked layer


def test_refuses_attention_that_ignores_the_mask(tiny_llava):
    ReferenceEngine(tiny_llava, "sdpa")  # making an engine prepares the attention
    model = tiny_llava.model
    original = model.config.get_text_config()._attn_implementation
    try:
        model.set_attn_implementation({"text_config": "sdpa"})
        with pytest.raises(RuntimeError, match="knockouts need"):
            check_prepared(model)
    finally:
        model.set_attn_implementation({"text_config": original})
    check_prepared(model)


def test_refuses_knockout_that_blocks_every_key(tiny_llava, tmp_path):
    inputs, groups = _sample_and_groups(tiny_llava, tmp_path)
    engine = ReferenceEngine(tiny_llava, "sdpa")
    everything = torch.arange(inputs.length)
    with pytest.raises(ValueError, match="every key"):
        engine.run(engine.clean(inputs), [KnockoutJob(BlockEdges(everything, groups.last), range(1))])
