"""Tiny models: real architectures and geometry, deterministic, safetensors; prompts; preprocessing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from mmflow.inputs.prompts import build_prompt
from mmflow.models.registry import _apply_preprocess
from mmflow.models.synthetic import tiny
from mmflow.models.synthetic.processor_builder import CLIP_MEAN, CLIP_STD


def test_prompts_are_the_papers():
    vicuna = build_prompt("vicuna_v1", "Is the jar full or empty?")
    assert vicuna.text == (
        "A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's questions. "
        "USER: <image>\nIs the jar full or empty? \n"
        "Answer the question using a single word or phrase. ASSISTANT:"
    )
    assert vicuna.text[slice(*vicuna.question_span)] == "Is the jar full or empty?" and vicuna.add_bos
    llama3 = build_prompt("llama3", "What color is it?")
    assert llama3.text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n")
    assert llama3.text.endswith("<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    assert llama3.text[slice(*llama3.question_span)] == "What color is it?" and not llama3.add_bos
    with pytest.raises(ValueError):
        build_prompt("alpaca", "q")


@pytest.mark.parametrize("fixture", ["tiny_llava", "tiny_llava_next"])
def test_tiny_models_load_from_safetensors_with_real_geometry(fixture, request):
    loaded = request.getfixturevalue(fixture)
    folder = Path(loaded.path)
    assert list(folder.glob("*.safetensors")) and not list(folder.glob("*.bin"))
    vision = loaded.model.config.vision_config
    assert (vision.image_size, vision.patch_size) == (336, 14)
    assert loaded.n_layers == 8
    assert loaded.model.config.get_text_config().model_type == "llama"


def test_tokenizer_styles_match_the_real_ones(tiny_llava, tiny_llava_next):
    sp, bl = tiny_llava.tokenizer, tiny_llava_next.tokenizer
    assert sp.convert_ids_to_tokens(sp(" the red jar", add_special_tokens=False)["input_ids"])[:2] == [
        "▁the",
        "▁red",
    ]
    assert sp("x")["input_ids"][0] == sp.bos_token_id  # LLaMA adds <s>
    assert "<0xC3>" in sp.convert_ids_to_tokens(
        sp("é", add_special_tokens=False)["input_ids"]
    )  # byte fallback
    assert bl.convert_ids_to_tokens(bl(" the red", add_special_tokens=False)["input_ids"]) == ["Ġthe", "Ġred"]
    assert bl.decode(bl("naïve ☃", add_special_tokens=False)["input_ids"]) == "naïve ☃"  # bytes round-trip


def test_tiny_build_is_deterministic():
    spec = tiny.TINY_SPECS["tiny-llava"]
    tokenizer = tiny.build_tokenizer(spec.tokenizer_style, 400, ["Is the jar red or blue?"] * 5)
    a, b = tiny.build_model(spec, tokenizer).state_dict(), tiny.build_model(spec, tokenizer).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_pad_preprocessing_pads_with_the_mean_colour():
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    class Holder:
        image_processor = CLIPImageProcessorPil(
            size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}
        )

    processor = _apply_preprocess(Holder(), "pad")
    pixels = processor.image_processor(Image.new("RGB", (500, 250), (0, 0, 0)), return_tensors="pt")[
        "pixel_values"
    ]
    black = -CLIP_MEAN[0] / CLIP_STD[0]
    assert pixels.shape == (1, 3, 336, 336)
    assert abs(float(pixels[0, 0, 0, 0])) < 0.02  # padding band: mean colour, normalised to ~0
    assert float(pixels[0, 0, 168, 168]) == pytest.approx(black, abs=1e-3)  # the image itself, not cropped
    with pytest.raises(ValueError):
        _apply_preprocess(Holder(), "stretch")
