"""Tiny random-weight replicas of the newer LLaVA series and of Qwen2.5-VL (issue 17).

Each copies its real checkpoint's architecture class, vision geometry, image packing, decoder family
and prompt format; only widths and depths are small. Real geometry:

- `tiny-llava-1.6-mistral`: LLaVA-NeXT, CLIP 336 px / 14 px, anyres pinpoints of llava-v1.6, Mistral
  decoder with `sliding_window` 4096 (set, as in Mistral-7B v0.1, but longer than any sequence here),
  the real Mistral-7B SentencePiece vocabulary (`vocab/mistral.tokenizer.json.xz`) plus `<image>` and
  `<pad>` as llava-hf adds them.
- `tiny-llava-1.6-34b`: LLaVA-NeXT with a Llama-architecture decoder (Yi-34B is one), grouped KV, a
  SentencePiece-style tokenizer built here in Yi's style (byte fallback, ChatML special tokens): Yi's
  own vocabulary is not available offline.
- `tiny-llava-onevision`: SigLIP 384 px / 14 px (27 x 27 = 729 tokens per crop, "full" features),
  anyres_max_9 over 384 px tiles with unpadding and feature downsizing, Qwen2 decoder (q/k/v biases,
  grouped KV), a Qwen-style byte-level BPE tokenizer built here.
- `tiny-qwen2.5-vl`: Qwen2.5-VL's window-attention ViT with 14 px patches, 2 x 2 patch merging and
  dynamic resolution (the real min/max pixels), multimodal rotary positions (mrope sections scaled to
  the tiny head size), the same Qwen-style tokenizer with the vision special tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mmflow.models.processors import build_image_processor
from mmflow.models.tiny import (
    CLIP_MEAN,
    CLIP_STD,
    IMAGE_TOKEN,
    NEXT_PINPOINTS,
    TINY_SPECS,
    build_tokenizer,
    ensure_tiny_model,
    save_built_model,
    tokenizer_corpus,
)

BUILD_VERSION = 3  # bump when a builder here changes, so stale caches are rebuilt
CHATML_TOKENS = ["<|im_start|>", "<|im_end|>"]
QWEN_VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
# Qwen2's pre-tokenizer split (digits one at a time, otherwise as GPT-4's cl100k).
QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# LLaVA-OneVision's pinpoints: every 384 px tile grid from 1 x 1 to 6 x 6.
ONEVISION_PINPOINTS = [[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)]
SIGLIP_MEAN = [0.5, 0.5, 0.5]
SIGLIP_STD = [0.5, 0.5, 0.5]
QWEN_MEAN = [0.48145466, 0.4578275, 0.40821073]
QWEN_STD = [0.26862954, 0.26130258, 0.27577711]
QWEN_MIN_PIXELS = 56 * 56
QWEN_MAX_PIXELS = 12845056  # Qwen2.5-VL-7B-Instruct's preprocessor_config.json (min 3136)


@dataclass(frozen=True)
class SeriesSpec:
    """A tiny replica: its architecture, decoder family, tokenizer and sizes."""

    name: str
    architecture: str  # llava_next | llava_onevision | qwen2_5_vl
    decoder: str  # mistral | llama | qwen2
    tokenizer: str  # mistral (the real vocabulary) | yi | qwen
    text_layers: int = 8
    text_hidden: int = 64
    text_heads: int = 4
    text_kv_heads: int = 2
    vision_layers: int = 2
    vision_hidden: int = 32
    vocab_size: int = 2000
    rope_theta: float = 10000.0
    sliding_window: int | None = None
    seed: int = 0


SERIES_SPECS: dict[str, SeriesSpec] = {
    spec.name: spec
    for spec in (
        SeriesSpec(
            "tiny-llava-1.6-mistral", "llava_next", "mistral", "mistral", rope_theta=1e6, sliding_window=4096
        ),
        SeriesSpec("tiny-llava-1.6-34b", "llava_next", "llama", "yi", rope_theta=5e6),
        SeriesSpec("tiny-llava-onevision", "llava_onevision", "qwen2", "qwen", rope_theta=1e6),
        SeriesSpec("tiny-qwen2.5-vl", "qwen2_5_vl", "qwen2", "qwen", rope_theta=1e6),
    )
}


def load_vocabulary(name: str):
    """A real vocabulary shipped with mmflow (`vocab/<name>.tokenizer.json.xz`) as a Tokenizer."""
    import lzma

    from tokenizers import Tokenizer

    path = Path(__file__).resolve().parent / "vocab" / f"{name}.tokenizer.json.xz"
    return Tokenizer.from_str(lzma.decompress(path.read_bytes()).decode("utf-8"))


def build_series_tokenizer(spec: SeriesSpec, corpus: list[str]):
    """The replica's tokenizer: Mistral's real vocabulary, or one trained here in Yi's / Qwen's style."""
    from transformers import PreTrainedTokenizerFast

    if spec.tokenizer == "mistral":
        fast = PreTrainedTokenizerFast(
            tokenizer_object=load_vocabulary("mistral"),
            bos_token="<s>",
            eos_token="</s>",
            unk_token="<unk>",
        )
        fast.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})  # 32000, as in llava-hf
        fast.add_special_tokens({"pad_token": "<pad>"})  # 32001
        return fast
    if spec.tokenizer == "yi":
        fast = build_tokenizer("sentencepiece", spec.vocab_size, corpus)
        fast.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN, *CHATML_TOKENS]})
        fast.eos_token = "<|im_end|>"
        return fast
    if spec.tokenizer == "qwen":
        return _qwen_tokenizer(spec.vocab_size, corpus)
    raise ValueError(f"unknown tokenizer {spec.tokenizer!r}")


def _qwen_tokenizer(vocab_size: int, corpus: list[str]):
    """Byte-level BPE with Qwen2's split, no BOS, `<|endoftext|>` as pad and ChatML + vision specials."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", *CHATML_TOKENS]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN, *QWEN_VISION_TOKENS]})
    return fast


def _text_config(spec: SeriesSpec, tokenizer) -> dict:
    """Decoder sizes and ids shared by every family (a dict: each family's config class takes it)."""
    head_dim = spec.text_hidden // spec.text_heads
    config = dict(
        vocab_size=len(tokenizer),
        hidden_size=spec.text_hidden,
        intermediate_size=spec.text_hidden * 3,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads,
        num_key_value_heads=spec.text_kv_heads,
        max_position_embeddings=32768,
        rope_parameters={"rope_type": "default", "rope_theta": spec.rope_theta},
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if spec.decoder == "mistral":
        config.update(model_type="mistral", sliding_window=spec.sliding_window, head_dim=head_dim)
    elif spec.decoder == "llama":
        config.update(model_type="llama")
    elif spec.architecture == "qwen2_5_vl":  # mrope sections in the real 1 : 1.5 : 1.5 ratio of head_dim / 2
        half = head_dim // 2
        section = [half // 4, (half - half // 4) // 2]
        config["rope_parameters"]["mrope_section"] = [section[0], section[1], half - sum(section)]
    else:
        config.update(model_type="qwen2", use_sliding_window=False, sliding_window=spec.sliding_window)
    return config


def build_series_processor(spec: SeriesSpec, tokenizer):
    """The real family's processor at the real image geometry."""
    if spec.architecture == "llava_next":
        from transformers import LlavaNextProcessor
        from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

        image_processor = LlavaNextImageProcessorPil(
            image_grid_pinpoints=NEXT_PINPOINTS,
            size={"shortest_edge": 336},
            crop_size={"height": 336, "width": 336},
            image_mean=CLIP_MEAN,
            image_std=CLIP_STD,
        )
        return LlavaNextProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            patch_size=14,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,
            image_token=IMAGE_TOKEN,
        )
    if spec.architecture == "llava_onevision":
        from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
            LlavaOnevisionImageProcessorPil,
        )

        image_processor = LlavaOnevisionImageProcessorPil(
            image_grid_pinpoints=ONEVISION_PINPOINTS,
            size={"height": 384, "width": 384},
            image_mean=SIGLIP_MEAN,
            image_std=SIGLIP_STD,
            do_pad=True,
        )
        return build_image_processor(
            "LlavaOnevisionProcessor",
            image_processor=image_processor,
            tokenizer=tokenizer,
            num_image_tokens=729,
            vision_feature_select_strategy="full",
            vision_aspect_ratio="anyres_max_9",
            image_token=IMAGE_TOKEN,
        )
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=QWEN_MIN_PIXELS,
        max_pixels=QWEN_MAX_PIXELS,
        patch_size=14,
        merge_size=2,
        temporal_patch_size=2,
        image_mean=QWEN_MEAN,
        image_std=QWEN_STD,
    )
    return build_image_processor("Qwen2_5_VLProcessor", image_processor=image_processor, tokenizer=tokenizer)


def build_series_model(spec: SeriesSpec, tokenizer):
    """A seeded random-weight model of the spec's architecture."""
    import torch

    text = _text_config(spec, tokenizer)
    torch.manual_seed(spec.seed)
    if spec.architecture == "qwen2_5_vl":
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

        vision = dict(
            depth=spec.vision_layers,
            hidden_size=spec.vision_hidden,
            intermediate_size=spec.vision_hidden * 2,
            num_heads=2,
            out_hidden_size=spec.text_hidden,
            fullatt_block_indexes=[spec.vision_layers - 1],
        )
        ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in _QWEN_IDS.items()}
        config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)
        return Qwen2_5_VLForConditionalGeneration(config)
    image_token = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if spec.architecture == "llava_onevision":
        from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

        vision = dict(
            model_type="siglip_vision_model",
            hidden_size=spec.vision_hidden,
            intermediate_size=spec.vision_hidden * 2,
            num_hidden_layers=spec.vision_layers,
            num_attention_heads=2,
            image_size=384,
            patch_size=14,
            vision_use_head=False,
        )
        config = LlavaOnevisionConfig(
            vision_config=vision,
            text_config=text,
            image_token_index=image_token,
            image_grid_pinpoints=ONEVISION_PINPOINTS,
            vision_feature_layer=-1,
            vision_feature_select_strategy="full",
            vision_aspect_ratio="anyres_max_9",
        )
        model = LlavaOnevisionForConditionalGeneration(config)
    else:
        from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

        vision = dict(
            model_type="clip_vision_model",
            hidden_size=spec.vision_hidden,
            intermediate_size=spec.vision_hidden * 2,
            num_hidden_layers=spec.vision_layers,
            num_attention_heads=2,
            image_size=336,
            patch_size=14,
            projection_dim=spec.vision_hidden,
        )
        config = LlavaNextConfig(
            vision_config=vision,
            text_config=text,
            image_token_index=image_token,
            image_grid_pinpoints=NEXT_PINPOINTS,
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",
        )
        model = LlavaNextForConditionalGeneration(config)
    with torch.no_grad():  # the newline embedding is torch.empty upstream: make it seeded and finite
        model.model.image_newline.normal_(0.0, 1.0 / spec.text_hidden**0.5)
    return model


_QWEN_IDS = {
    "image_token_id": "<|image_pad|>",
    "video_token_id": "<|video_pad|>",
    "vision_start_token_id": "<|vision_start|>",
    "vision_end_token_id": "<|vision_end|>",
}


def build(name: str):
    """(model, processor) of the tiny replica `name`, ready for `save_pretrained`."""
    spec = SERIES_SPECS[name]
    corpus = tokenizer_corpus(("vicuna_v1", "llama3", PROMPT_FORMAT[name]))
    tokenizer = build_series_tokenizer(spec, corpus)
    return build_series_model(spec, tokenizer), build_series_processor(spec, tokenizer)


PROMPT_FORMAT = {
    "tiny-llava-1.6-mistral": "mistral_instruct",
    "tiny-llava-1.6-34b": "chatml_direct",
    "tiny-llava-onevision": "qwen",
    "tiny-qwen2.5-vl": "qwen2_vl",
}


def ensure_model(name: str, root: Path | None = None) -> Path:
    """The folder of any `tiny:<name>` model: the two first-round tiny models or a series replica."""
    if name in TINY_SPECS:
        return ensure_tiny_model(name, root)
    if name not in SERIES_SPECS:
        raise KeyError(f"unknown tiny model {name!r}; known: {sorted([*TINY_SPECS, *SERIES_SPECS])}")
    return save_built_model(name, BUILD_VERSION, lambda: build(name), root)
