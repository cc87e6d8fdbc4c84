"""One builder for every LLaVA-family model mmflow makes: tiny, tiny-series, toy, GPU check, replicas.

A caller states its dimensions in a `ModelSpec` (decoder `TextSpec`, vision tower `VisionSpec`,
vocabulary and token ids); `model_config` turns it into the `transformers` config of its architecture
(LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision, Qwen2.5-VL) with that architecture's real fixed fields
(feature layer and strategy, anyres pinpoints, projector), and `build_weights` makes seeded random
weights. Nothing here imports the rest of mmflow.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

IMAGE_TOKEN = "<image>"
# liuhaotian/llava-v1.6-* and lmms-lab/llama3-llava-next-8b config.json `image_grid_pinpoints`, copied
# verbatim by transformers' convert_llava_next_weights_to_hf.py (which reads them as [height, width]).
NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
# LLaVA-OneVision's pinpoints: every 384 px tile grid from 1 x 1 to 6 x 6.
ONEVISION_PINPOINTS = [[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)]


@dataclass(frozen=True)
class Architecture:
    """What a family fixes: its classes and (LLaVA families) feature layer, strategy and pinpoints."""

    config_class: str
    model_class: str
    vision: str  # default vision tower: clip | siglip | qwen2_5_vl
    feature_layer: int | None = None
    select_strategy: str | None = None
    pinpoints: list[list[int]] | None = None
    fields: Mapping[str, Any] = field(default_factory=dict)  # further top-level config fields


ARCHITECTURES = {
    # llava-hf config.json: vision_feature_layer -2 (mm_vision_select_layer=-2 in the originals) and
    # strategy "default", which drops CLS (mm_vision_select_feature="patch").
    "llava": Architecture("LlavaConfig", "LlavaForConditionalGeneration", "clip", -2, "default"),
    "llava_next": Architecture(
        "LlavaNextConfig", "LlavaNextForConditionalGeneration", "clip", -2, "default", NEXT_PINPOINTS
    ),
    # transformers' LlavaOnevisionConfig defaults (llava-hf's OneVision configs): last layer, all tokens
    # (no CLS to drop in SigLIP), anyres_max_9; ONEVISION_PINPOINTS equal its default pinpoints.
    "llava_onevision": Architecture(
        "LlavaOnevisionConfig",
        "LlavaOnevisionForConditionalGeneration",
        "siglip",
        -1,
        "full",
        ONEVISION_PINPOINTS,
        {"vision_aspect_ratio": "anyres_max_9"},
    ),
    "qwen2_5_vl": Architecture("Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration", "qwen2_5_vl"),
}


@dataclass(frozen=True)
class TextSpec:
    """The decoder: widths, depth, heads, rope theta (Llama / Mistral / Qwen2 families)."""

    hidden: int  # hidden_size
    intermediate: int  # MLP width
    layers: int
    heads: int
    kv_heads: int  # grouped-query attention when < heads
    rope_theta: float = 10000.0
    max_positions: int = 8192  # max_position_embeddings (tokens)
    family: str | None = "llama"  # text model_type: llama | mistral | qwen2; None: the architecture's own
    norm_eps: float | None = None  # rms_norm_eps; None: the family's default
    sliding_window: int | None = None  # Mistral / Qwen2 (tokens)


@dataclass(frozen=True)
class VisionSpec:
    """The vision tower: widths, depth, heads and geometry (pixels)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    image_size: int = 336  # one view's side, px (CLIP / SigLIP; Qwen2.5-VL takes any size)
    patch_size: int = 14  # px
    projection_dim: int | None = None  # CLIP only: its projection width (unused by LLaVA, in config.json)
    family: str | None = None  # clip | siglip | qwen2_5_vl; None: the architecture's
    fields: Mapping[str, Any] = field(default_factory=dict)  # further tower fields (e.g. hidden_act)


@dataclass(frozen=True)
class ModelSpec:
    """A whole model: architecture, towers, the vocabulary size and token ids of its tokenizer."""

    architecture: str  # a key of ARCHITECTURES
    text: TextSpec
    vision: VisionSpec
    vocab_size: int
    image_token_id: int
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    feature_layer: int | None = None  # None: the architecture's
    select_strategy: str | None = None  # None: the architecture's
    pinpoints: list[list[int]] | None = None  # None: the architecture's ([height, width] px)
    fields: Mapping[str, Any] = field(default_factory=dict)  # further top-level config fields


def token_ids(tokenizer, image_token: str = IMAGE_TOKEN) -> dict[str, Any]:
    """The `ModelSpec` vocabulary and token-id fields of `tokenizer` (vocab_size = len(tokenizer))."""
    return dict(
        vocab_size=len(tokenizer),
        image_token_id=tokenizer.convert_tokens_to_ids(image_token),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def text_config(spec: ModelSpec) -> dict[str, Any]:
    """The decoder's config fields (a dict: each architecture's config class builds its own object)."""
    text = spec.text
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": text.rope_theta}
    if spec.architecture == "qwen2_5_vl":  # mrope sections in the real 1 : 1.5 : 1.5 ratio of head_dim / 2
        half = text.hidden // text.heads // 2
        section = [half // 4, (half - half // 4) // 2]
        rope["mrope_section"] = [section[0], section[1], half - sum(section)]
    config: dict[str, Any] = dict(
        vocab_size=spec.vocab_size,
        hidden_size=text.hidden,
        intermediate_size=text.intermediate,
        num_hidden_layers=text.layers,
        num_attention_heads=text.heads,
        num_key_value_heads=text.kv_heads,
        max_position_embeddings=text.max_positions,
        rope_parameters=rope,
        bos_token_id=spec.bos_token_id,
        eos_token_id=spec.eos_token_id,
        pad_token_id=spec.pad_token_id,
    )
    if text.family is not None:
        config["model_type"] = text.family
    if text.norm_eps is not None:
        config["rms_norm_eps"] = text.norm_eps
    if text.family == "mistral":
        config.update(sliding_window=text.sliding_window, head_dim=text.hidden // text.heads)
    elif text.family == "qwen2":
        config.update(use_sliding_window=False, sliding_window=text.sliding_window)
    return config


def vision_config(spec: ModelSpec) -> dict[str, Any]:
    """The vision tower's config fields (CLIP, SigLIP without head, or Qwen2.5-VL's windowed ViT)."""
    vision = spec.vision
    family = vision.family or ARCHITECTURES[spec.architecture].vision
    if family == "qwen2_5_vl":  # full attention every 8th block as Qwen2.5-VL-7B's [7, 15, 23, 31], and last
        full = sorted({i for i in range(vision.layers) if i % 8 == 7} | {vision.layers - 1})
        return dict(
            depth=vision.layers,
            hidden_size=vision.hidden,
            intermediate_size=vision.intermediate,
            num_heads=vision.heads,
            out_hidden_size=spec.text.hidden,
            fullatt_block_indexes=full,
            **vision.fields,
        )
    config: dict[str, Any] = dict(
        model_type={"clip": "clip_vision_model", "siglip": "siglip_vision_model"}[family],
        hidden_size=vision.hidden,
        intermediate_size=vision.intermediate,
        num_hidden_layers=vision.layers,
        num_attention_heads=vision.heads,
        image_size=vision.image_size,
        patch_size=vision.patch_size,
    )
    if family == "clip" and vision.projection_dim is not None:
        config["projection_dim"] = vision.projection_dim
    if family == "siglip":
        config["vision_use_head"] = False  # LLaVA-OneVision reads the patch features, no pooling head
    return {**config, **vision.fields}


def model_config(spec: ModelSpec):
    """The `transformers` config of `spec` (`LlavaConfig`, `LlavaNextConfig`, ... per architecture)."""
    import transformers

    arch = ARCHITECTURES[spec.architecture]
    config_class = getattr(transformers, arch.config_class)
    text, vision = text_config(spec), vision_config(spec)
    if spec.architecture == "qwen2_5_vl":
        return config_class(
            text_config=text, vision_config=vision, image_token_id=spec.image_token_id, **spec.fields
        )
    pinpoints = spec.pinpoints if spec.pinpoints is not None else arch.pinpoints
    return config_class(
        vision_config=vision,
        text_config=text,
        image_token_index=spec.image_token_id,
        projector_hidden_act="gelu",
        vision_feature_layer=arch.feature_layer if spec.feature_layer is None else spec.feature_layer,
        vision_feature_select_strategy=spec.select_strategy or arch.select_strategy,
        **({} if pinpoints is None else {"image_grid_pinpoints": pinpoints}),
        **arch.fields,
        **spec.fields,
    )


def model_class(config):
    """The `...ForConditionalGeneration` class of a config built here."""
    import transformers

    (arch,) = [a for a in ARCHITECTURES.values() if a.config_class == type(config).__name__]
    return getattr(transformers, arch.model_class)


def build_weights(config, seed: int = 0, dtype=None, device=None):
    """Seeded random weights for `config` (a `model_config` result).

    `dtype`: None keeps the config as it is (float32, `config.dtype` unset); a torch dtype goes through
    `_from_config` (which records it in the config); `"meta"` builds on the meta device, unseeded.
    `device`: where the weights are created (default: torch's default device).
    """
    from contextlib import nullcontext

    import torch

    cls = model_class(config)
    if dtype == "meta":
        with torch.device("meta"):
            return cls(config)
    torch.manual_seed(seed)
    with torch.device(device) if device is not None else nullcontext():
        model = cls(config) if dtype is None else cls._from_config(config, dtype=dtype)
        if hasattr(model.model, "image_newline"):  # initialised from torch.empty upstream
            with torch.no_grad():
                model.model.image_newline.normal_(0.0, config.text_config.hidden_size**-0.5)
    return model
