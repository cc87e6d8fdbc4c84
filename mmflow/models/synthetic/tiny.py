"""Tiny same-architecture LLaVA models, built locally and saved with `save_pretrained`.

They share everything with the real checkpoints except widths and depths: the CLIP vision tower
at 336 px with 14 px patches (576 tokens per view), the projector, a Llama decoder, LLaVA-NeXT's
anyres tiles and newline tokens, and tokenizers in the style of each real one (SentencePiece-like
with byte fallback for Vicuna, byte-level BPE for LLaMA-3). Weights are random but deterministic.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from mmflow.inputs.prompts import build_prompt
from mmflow.models.synthetic.builder import (
    IMAGE_TOKEN,
    ModelSpec,
    TextSpec,
    VisionSpec,
    build_weights,
    model_config,
    token_ids,
)
from mmflow.models.synthetic.processor_builder import ProcessorSpec, make_processor
from mmflow.storage.files import apply_umask, make_temp_dir

BUILD_VERSION = 2  # bump when the builder changes, so stale caches are rebuilt


@dataclass(frozen=True)
class TinySpec:
    """What a tiny model copies from its real counterpart, and how small it is."""

    name: str
    architecture: str  # "llava" or "llava_next"
    tokenizer_style: str  # "sentencepiece" or "byte_level"
    prompt_format: str
    text_layers: int = 8
    text_hidden: int = 64
    text_heads: int = 4
    text_kv_heads: int = 4
    vision_layers: int = 2
    vision_hidden: int = 32
    image_size: int = 336
    patch_size: int = 14
    vocab_size: int = 2000
    rope_theta: float = 10000.0
    seed: int = 0


TINY_SPECS: dict[str, TinySpec] = {
    "tiny-llava": TinySpec("tiny-llava", "llava", "sentencepiece", "vicuna_v1"),
    "tiny-llava-next": TinySpec(
        "tiny-llava-next", "llava_next", "byte_level", "llama3", text_kv_heads=2, rope_theta=500000.0
    ),
}


def cache_root() -> Path:
    """`$MMFLOW_CACHE` or `~/.cache/mmflow`: where built models and synthetic data live."""
    return Path(os.environ.get("MMFLOW_CACHE", Path.home() / ".cache" / "mmflow"))


def tokenizer_corpus(formats: tuple[str, ...] = ("vicuna_v1", "llama3")) -> list[str]:
    """Text the tiny tokenizers are trained on: the prompts in `formats`, GQA questions and answer words."""
    from mmflow.data.shapes import answer_vocabulary

    gqa_dir = Path(__file__).resolve().parents[2] / "data" / "gqa_tasks"
    lines: list[str] = []
    for fmt in formats:  # repeated so the template words become whole tokens, as in real vocabularies
        lines.extend([build_prompt(fmt, "Is the circle red or blue?").text] * 50)
    for csv_path in sorted(gqa_dir.glob("*.csv")):
        import pandas as pd

        frame = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
        lines.extend(frame["question"].tolist())
        lines.extend(frame["answer"].tolist())
    for word in answer_vocabulary() + ["yes", "no", "left", "right"]:
        lines.extend([word, word.capitalize(), f" {word}", f" {word.capitalize()}"])
    return lines


def build_tokenizer(style: str, vocab_size: int, corpus: list[str]):
    """Train a BPE tokenizer in the style of LLaMA-1/2 (`sentencepiece`) or LLaMA-3 (`byte_level`)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if style == "sentencepiece":
        byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
        tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
        # Newlines and punctuation stay separate pieces, as in LLaMA's SentencePiece vocabulary.
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split("\n", behavior="isolated"),
                pre_tokenizers.Punctuation(behavior="isolated"),
                pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True),
            ]
        )
        tok.decoder = decoders.Sequence(
            [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
        )
        special = ["<unk>", "<s>", "</s>"]
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=special + byte_tokens, show_progress=False
        )
        tok.train_from_iterator(corpus, trainer)
        bos_id = tok.token_to_id("<s>")
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos_id)])
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<unk>"
        )
        fast.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
        return fast
    if style == "byte_level":
        llama3_split = (
            r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
            r"|\s*[\r\n]+|\s+(?!\S)|\s+"
        )
        from tokenizers import Regex

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(llama3_split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        tok.decoder = decoders.ByteLevel()
        special = [
            "<|begin_of_text|>",
            "<|end_of_text|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|eot_id|>",
        ]
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=special,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(corpus, trainer)
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tok,
            bos_token="<|begin_of_text|>",
            eos_token="<|eot_id|>",
            pad_token="<|end_of_text|>",
        )
        fast.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
        return fast
    raise ValueError(f"unknown tokenizer style {style!r} (sentencepiece or byte_level)")


def build_processor(spec: TinySpec, tokenizer):
    """The processor of the real checkpoint's family, at the real image geometry (LLaVA-1.5: "pad")."""
    return make_processor(ProcessorSpec(spec.architecture, spec.image_size, spec.patch_size), tokenizer)


def build_model(spec: TinySpec, tokenizer):
    """A randomly initialised (seeded) LLaVA or LLaVA-NeXT with the spec's sizes."""
    h, v = spec.text_hidden, spec.vision_hidden
    config = model_config(
        ModelSpec(
            spec.architecture,
            TextSpec(h, h * 3, spec.text_layers, spec.text_heads, spec.text_kv_heads, spec.rope_theta),
            VisionSpec(v, v * 2, spec.vision_layers, 2, spec.image_size, spec.patch_size, projection_dim=v),
            **token_ids(tokenizer),
        )
    )
    return build_weights(config, spec.seed)


def ensure_tiny_model(name: str, root: Path | None = None) -> Path:
    """Return the folder of tiny model `name`, building and saving it on first use (atomically).

    The series replicas (`mmflow.models.synthetic.tiny_series`) are built through the same `save_built_model`.
    """
    if name not in TINY_SPECS:
        raise KeyError(f"unknown tiny model {name!r}; known: {sorted(TINY_SPECS)}")

    def build():
        spec = TINY_SPECS[name]
        tokenizer = build_tokenizer(spec.tokenizer_style, spec.vocab_size, tokenizer_corpus())
        return build_model(spec, tokenizer), build_processor(spec, tokenizer)

    return save_built_model(name, BUILD_VERSION, build, root)


def save_built_model(name: str, version: int, build, root: Path | None = None) -> Path:
    """`<root>/<name>-v<version>`, made once from `build() -> (model, processor)` with save_pretrained
    into a staging folder renamed into place (a concurrent builder's finished folder is kept)."""
    target = (root or cache_root() / "models") / f"{name}-v{version}"
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    model, processor = build()
    staging = make_temp_dir(target.parent, f".{name}-")
    try:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        apply_umask(staging)
        try:
            os.replace(staging, target)
        except OSError:  # another process finished the same build first
            if not (target / "config.json").exists():
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target
