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

from mmflow.models.synthetic.builder import (
    IMAGE_TOKEN,
    ModelSpec,
    TextSpec,
    VisionSpec,
    build_weights,
    model_config,
    token_ids,
)
from mmflow.models.synthetic.processor_builder import ProcessorSpec, make_processor, vocabulary_json
from mmflow.models.synthetic.tiny import (
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
    image_size: int = 336  # px: CLIP-L/336 views; SigLIP/384 for OneVision (Qwen2.5-VL: any size)
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
        SeriesSpec(
            "tiny-llava-onevision", "llava_onevision", "qwen2", "qwen", image_size=384, rope_theta=1e6
        ),
        SeriesSpec("tiny-qwen2.5-vl", "qwen2_5_vl", "qwen2", "qwen", rope_theta=1e6),
    )
}


def build_series_tokenizer(spec: SeriesSpec, corpus: list[str]):
    """The replica's tokenizer: Mistral's real vocabulary, or one trained here in Yi's / Qwen's style."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    if spec.tokenizer == "mistral":
        fast = PreTrainedTokenizerFast(
            tokenizer_object=Tokenizer.from_str(vocabulary_json("mistral")),
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


def build_series_processor(spec: SeriesSpec, tokenizer):
    """The real family's processor at the real image geometry (CLIP 336 px, SigLIP 384 px, Qwen's pixels)."""
    return make_processor(ProcessorSpec(spec.architecture, spec.image_size), tokenizer)


def build_series_model(spec: SeriesSpec, tokenizer):
    """A seeded random-weight model of the spec's architecture."""
    qwen = spec.architecture == "qwen2_5_vl"
    h, v = spec.text_hidden, spec.vision_hidden
    text = TextSpec(
        *(h, h * 3, spec.text_layers, spec.text_heads, spec.text_kv_heads, spec.rope_theta),
        max_positions=32768,
        family=None if qwen else spec.decoder,  # Qwen2.5-VL: its own text config
        sliding_window=spec.sliding_window,
    )
    vision = VisionSpec(v, v * 2, spec.vision_layers, 2, spec.image_size, 14, projection_dim=v)
    ids = token_ids(tokenizer, "<|image_pad|>" if qwen else IMAGE_TOKEN)
    fields = {key: tokenizer.convert_tokens_to_ids(token) for key, token in _QWEN_IDS.items()} if qwen else {}
    return build_weights(
        model_config(ModelSpec(spec.architecture, text, vision, **ids, fields=fields)), spec.seed
    )


_QWEN_IDS = {  # Qwen2.5-VL's other vision token ids (image_token_id is "<|image_pad|>")
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
