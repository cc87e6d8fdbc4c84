"""The answer decoded from the clean pass's cache equals `model.generate`'s greedy answer, token for token."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import model_config, noise_sample

from mmflow.data import load_shapes
from mmflow.execution.answer import answer_from_clean, generate_answer, greedy_token_ids, not_plain_greedy
from mmflow.inputs.encode import encode
from mmflow.knockout import make_engine
from mmflow.knockout.clean_pass import FastCleanPass


@pytest.fixture(scope="module")
def toy_llava():
    from mmflow.config.spec import ModelSpec
    from mmflow.models.registry import load_model

    return load_model(ModelSpec.from_mapping(model_config("toy-llava")))


def generated_ids(loaded, inputs, max_new_tokens: int) -> list[int]:
    out = loaded.model.generate(
        **inputs.tensors,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=loaded.tokenizer.pad_token_id,
        eos_token_id=loaded.model.generation_config.eos_token_id,
    )
    return out[0, inputs.length :].tolist()


def samples_for(loaded, tmp_path, n: int):
    if loaded.name == "toy-llava":  # its own data, so that it answers (and stops at EOS) for real
        return load_shapes("ChooseAttr", n, seed=3, cache_dir=tmp_path / "shapes")
    rng = np.random.default_rng(7)
    questions = ["Is the jar full or empty?", "What colour is the cup on the left of the table?"]
    return [noise_sample(tmp_path, rng, question=questions[i % 2]) for i in range(n)]


@pytest.mark.slow
@pytest.mark.parametrize("model", ["tiny_llava", "tiny_llava_next", "toy_llava"])
@pytest.mark.parametrize("engine", ["fast", "reference"])
def test_cached_answer_equals_generate(model, engine, request, tmp_path):
    """Both prompt formats (vicuna_v1: tiny-llava, toy-llava; llama3: tiny-llava-next), both engines'
    clean passes; the full-length answers and answers cut at EOS after 1 and 2 tokens."""
    loaded = request.getfixturevalue(model)
    engine = make_engine(engine, loaded, "sdpa")
    config = loaded.model.generation_config
    original_eos = config.eos_token_id
    checked = {"full": 0, "early": 0}
    try:
        for sample in samples_for(loaded, tmp_path, 2):
            inputs = encode(loaded, sample)
            config.eos_token_id = original_eos
            full = generated_ids(loaded, inputs, 6)
            clean = engine.clean(inputs, first_target=inputs.length - 3)
            assert greedy_token_ids(loaded, clean, 6) == full
            assert clean.cache is None  # released after the answer
            checked["full"] += 1
            for stop in sorted(set(full[:2])):  # make an answer token the EOS: generate stops there
                config.eos_token_id = [stop, *([original_eos] if original_eos is not None else [])]
                expected = generated_ids(loaded, inputs, 6)
                assert len(expected) < 6 or stop not in expected[:-1]
                clean = engine.clean(inputs, first_target=inputs.length - 3)
                assert greedy_token_ids(loaded, clean, 6) == expected
                assert expected[-1] in config.eos_token_id
                checked["early"] += 1
    finally:
        config.eos_token_id = original_eos
    assert checked["full"] == 2 and checked["early"] >= 2


@pytest.mark.slow
def test_toy_answers_end_at_eos_and_text_matches(toy_llava, tmp_path):
    """The trained toy answers in a word and stops: same text as `generate`, fewer than 8 tokens."""
    engine = make_engine("fast", toy_llava, "sdpa")
    stopped = 0
    for sample in load_shapes("ChooseAttr", 4, seed=5, cache_dir=tmp_path / "shapes"):
        inputs = encode(toy_llava, sample)
        expected = generate_answer(toy_llava, inputs, 8)
        ids = generated_ids(toy_llava, inputs, 8)
        stopped += len(ids) < 8
        assert answer_from_clean(toy_llava, engine.clean(inputs, first_target=None), 8) == expected
        assert expected.strip()
    assert stopped == 4


def test_fast_engine_caches_survive_decoding(tiny_llava, tmp_path):
    """Decoding grows the cache without touching the K/V tensors the fast engine restarts from."""
    engine = make_engine("fast", tiny_llava, "sdpa")
    inputs = encode(tiny_llava, samples_for(tiny_llava, tmp_path, 1)[0])
    clean = engine.clean(inputs, first_target=inputs.length - 5)
    assert isinstance(clean, FastCleanPass)
    keys = [k.clone() for k in clean.keys]
    greedy_token_ids(tiny_llava, clean, 4)
    for before, after in zip(keys, clean.keys, strict=True):
        assert torch.equal(before, after) and after.shape[-2] == inputs.length


@pytest.mark.slow
def test_generation_config_that_changes_greedy_steps_uses_generate(tiny_llava, tmp_path):
    inputs = encode(tiny_llava, samples_for(tiny_llava, tmp_path, 1)[0])
    config = tiny_llava.model.generation_config
    assert not_plain_greedy(tiny_llava) is None
    config.repetition_penalty = 50.0
    try:
        assert not_plain_greedy(tiny_llava) == "generation_config.repetition_penalty=50.0"
        clean = make_engine("reference", tiny_llava, "sdpa").clean(inputs)
        assert answer_from_clean(tiny_llava, clean, 5) == generate_answer(tiny_llava, inputs, 5)
        assert clean.cache is None
    finally:
        config.repetition_penalty = 1.0
    with pytest.raises(ValueError, match="no key/value cache"):
        greedy_token_ids(tiny_llava, clean, 3)


def test_cache_is_passed_under_the_name_the_model_takes(tiny_llava, tmp_path):
    """No `past_key_values` deprecation (gone in transformers 5.40): the clean pass and the decode use the
    model's own cache argument, and the decoded answer still equals `generate`'s."""
    import inspect
    import warnings

    from mmflow.models.kv_cache import cache_kwargs

    name = "cache" if "cache" in inspect.signature(tiny_llava.model.forward).parameters else "past_key_values"
    assert list(cache_kwargs(tiny_llava.model, None)) == [name]
    inputs = encode(tiny_llava, samples_for(tiny_llava, tmp_path, 1)[0])
    expected = generated_ids(tiny_llava, inputs, 4)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*past_key_values.*")
        clean = make_engine("fast", tiny_llava, "sdpa").clean(inputs, first_target=inputs.length - 2)
        assert clean.cache is not None
        assert greedy_token_ids(tiny_llava, clean, 4) == expected
