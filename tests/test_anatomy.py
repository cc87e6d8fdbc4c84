"""One model anatomy: its parts named once for engines, hooks and analyses; loading leaves attention alone."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import model_config

from mmflow.config.spec import ModelSpec
from mmflow.knockout import make_engine
from mmflow.knockout.attention import IMPLEMENTATIONS
from mmflow.models.anatomy import anatomy_of
from mmflow.models.registry import load_model


@pytest.mark.parametrize("name", ["tiny-llava", "tiny-llava-next"])
def test_anatomy_names_the_language_models_parts(name):
    loaded = load_model(ModelSpec.from_mapping(model_config(name)))
    anatomy = loaded.anatomy
    language = loaded.model.model.language_model  # the one path, checked against the model here
    assert anatomy.layers is language.layers and anatomy.final_norm is language.norm
    assert anatomy.unembedding is loaded.model.lm_head and anatomy.decoder_kind == "llama"
    assert anatomy.backbone is loaded.model.model
    assert anatomy.depth == loaded.n_layers == model_config(name)["n_layers"] == len(language.layers)
    hidden = torch.randn(3, loaded.model.config.get_text_config().hidden_size)
    expected = loaded.model.lm_head(language.norm(hidden))
    torch.testing.assert_close(anatomy.unembedding(anatomy.final_norm(hidden)), expected)
    with pytest.raises(TypeError, match="no LLaVA-style language model"):
        anatomy_of(torch.nn.Linear(2, 2))


def test_loading_leaves_attention_alone_and_the_engine_prepares_it():
    loaded = load_model(ModelSpec.from_mapping(model_config("tiny-llava")))
    text = loaded.model.config.get_text_config()
    assert text._attn_implementation not in IMPLEMENTATIONS  # the checkpoint's own attention
    assert not any(hasattr(layer.self_attn, "_mmflow_layer") for layer in loaded.anatomy.layers)
    make_engine("reference", loaded, "eager")
    assert text._attn_implementation == "mmflow_eager"
    assert [layer.self_attn._mmflow_layer for layer in loaded.anatomy.layers] == list(range(loaded.n_layers))
    make_engine("fast", loaded, "sdpa")
    assert text._attn_implementation == "mmflow_sdpa"
    assert loaded.model.config.vision_config._attn_implementation not in IMPLEMENTATIONS


def test_configured_depth_must_match_the_checkpoint():
    config = {**model_config("tiny-llava"), "n_layers": 32}
    with pytest.raises(ValueError, match=r"'tiny-llava'.*n_layers=32.*has 8 decoder layers"):
        load_model(ModelSpec.from_mapping(config))
    assert dataclasses.is_dataclass(load_model(ModelSpec.from_mapping({**config, "n_layers": None})))
