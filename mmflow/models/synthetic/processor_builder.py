"""One builder for every processor mmflow makes: tiny, tiny-series, toy, GPU check, replicas.

A caller states its processor in a `ProcessorSpec` (architecture, view size and patch size, which image
processor, chat template); `make_processor(spec, tokenizer)` builds that architecture's processor
(`LlavaProcessor`, `LlavaNextProcessor`, image-only `LlavaOnevisionProcessor` / `Qwen2_5_VLProcessor`)
with the image-processor fields of the real checkpoints (normalisation, resize, crop, anyres
pinpoints, pixel bounds) and the token counting that matches `builder.model_config`'s feature strategy.
The packaged real vocabularies are read here too (`vocabulary_json`). Nothing here imports the rest of
mmflow beyond `builder` and (when building) `processors`; transformers is imported only when building.
"""

from __future__ import annotations

import importlib
import lzma
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmflow.models.synthetic.builder import ARCHITECTURES, IMAGE_TOKEN

VOCAB_DIR = Path(__file__).resolve().parents[1] / "vocab"

# openai/clip-vit-large-patch14-336 preprocessor_config.json (the vision tower of LLaVA-1.5 and -1.6; the
# same values are in llava-hf's preprocessor_config.json). Qwen2.5-VL-7B-Instruct's preprocessor_config.json
# normalises with the same OpenAI CLIP mean and std.
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
# SigLIP (LLaVA-OneVision's vision tower) normalises to [-1, 1].
SIGLIP_MEAN = [0.5, 0.5, 0.5]
SIGLIP_STD = [0.5, 0.5, 0.5]
QWEN_MIN_PIXELS = 56 * 56
QWEN_MAX_PIXELS = 12845056  # Qwen2.5-VL-7B-Instruct's preprocessor_config.json (min 3136)

# Image processors by kind: (transformers model folder, PIL-backend class).
IMAGE_PROCESSORS = {
    "clip": ("clip", "CLIPImageProcessorPil"),  # resize + centre crop (llava-hf's LLaVA-1.5 checkpoints)
    "llava": ("llava", "LlavaImageProcessorPil"),  # pads to a square first (LLaVA-1.5's "pad" aspect)
    "llava_next": ("llava_next", "LlavaNextImageProcessorPil"),  # anyres tiles + base view
    "llava_onevision": ("llava_onevision", "LlavaOnevisionImageProcessorPil"),  # anyres_max_9 tiles
    "qwen2_vl": ("qwen2_vl", "Qwen2VLImageProcessorPil"),  # dynamic resolution, 2 x 2 merged patches
}
# architecture (a key of builder.ARCHITECTURES) -> (processor class, default image processor kind)
PROCESSORS = {
    "llava": ("LlavaProcessor", "llava"),
    "llava_next": ("LlavaNextProcessor", "llava_next"),
    "llava_onevision": ("LlavaOnevisionProcessor", "llava_onevision"),
    "qwen2_5_vl": ("Qwen2_5_VLProcessor", "qwen2_vl"),
}


@dataclass(frozen=True)
class ProcessorSpec:
    """A processor: its architecture, image geometry, image processor and prompt parts."""

    architecture: str  # a key of builder.ARCHITECTURES (and of PROCESSORS)
    image_size: int = 336  # one view's side, px (CLIP / SigLIP; Qwen2.5-VL resizes by pixel count)
    patch_size: int = 14  # px
    image_processor: str | None = None  # a key of IMAGE_PROCESSORS; None: the architecture's
    pinpoints: list[list[int]] | None = None  # anyres grids ([height, width] px); None: the architecture's
    chat_template: str | None = None  # None: none saved (mmflow builds its prompts itself)
    image_token: str = IMAGE_TOKEN  # the placeholder the processor expands (LLaVA families)
    image_fields: Mapping[str, Any] = field(default_factory=dict)  # further image-processor fields


def image_processor_kind(spec: ProcessorSpec) -> str:
    return spec.image_processor or PROCESSORS[spec.architecture][1]


def image_processor_fields(spec: ProcessorSpec) -> dict[str, Any]:
    """The image processor's constructor fields: normalisation, resize/crop, pinpoints, pixel bounds."""
    kind, side = image_processor_kind(spec), spec.image_size
    pinpoints = spec.pinpoints if spec.pinpoints is not None else ARCHITECTURES[spec.architecture].pinpoints
    if kind == "qwen2_vl":
        fields: dict[str, Any] = dict(
            min_pixels=QWEN_MIN_PIXELS,
            max_pixels=QWEN_MAX_PIXELS,
            patch_size=spec.patch_size,
            merge_size=2,
            temporal_patch_size=2,
            image_mean=CLIP_MEAN,
            image_std=CLIP_STD,
        )
    elif kind == "llava_onevision":  # SigLIP views resized to the square, no crop
        fields = dict(
            image_grid_pinpoints=pinpoints,
            size={"height": side, "width": side},
            image_mean=SIGLIP_MEAN,
            image_std=SIGLIP_STD,
            do_pad=True,
        )
    else:  # CLIP views: shortest edge to the view size, then a centre crop
        fields = dict(
            size={"shortest_edge": side},
            crop_size={"height": side, "width": side},
            image_mean=CLIP_MEAN,
            image_std=CLIP_STD,
        )
        if kind == "llava":
            fields["do_pad"] = True
        elif kind == "llava_next":
            fields["image_grid_pinpoints"] = pinpoints
    return {**fields, **spec.image_fields}


def image_processor(spec: ProcessorSpec):
    """The image processor of `spec` (PIL backend)."""
    folder, name = IMAGE_PROCESSORS[image_processor_kind(spec)]
    module = importlib.import_module(f"transformers.models.{folder}.image_processing_pil_{folder}")
    return getattr(module, name)(**image_processor_fields(spec))


def processor_fields(spec: ProcessorSpec) -> dict[str, Any]:
    """The processor's own fields: how many tokens an image becomes (as the model's feature strategy)."""
    arch = ARCHITECTURES[spec.architecture]
    fields: dict[str, Any] = {}
    if spec.architecture == "llava_onevision":
        fields.update(
            num_image_tokens=(spec.image_size // spec.patch_size) ** 2,  # SigLIP has no CLS token
            vision_feature_select_strategy=arch.select_strategy,
            **arch.fields,  # vision_aspect_ratio: anyres_max_9
            image_token=spec.image_token,
        )
    elif spec.architecture != "qwen2_5_vl":  # Qwen2.5-VL counts merged patches, its pad token its own
        fields.update(
            patch_size=spec.patch_size,
            vision_feature_select_strategy=arch.select_strategy,
            num_additional_image_tokens=1,  # the CLS token, dropped by the "default" strategy
            image_token=spec.image_token,
        )
    if spec.chat_template is not None:
        fields["chat_template"] = spec.chat_template
    return fields


def make_processor(spec: ProcessorSpec, tokenizer):
    """The architecture's processor around `tokenizer` (image-only for the families that take video)."""
    import transformers

    from mmflow.inputs.processors import VIDEO_FAMILIES, build_image_processor

    name = PROCESSORS[spec.architecture][0]
    parts = dict(image_processor=image_processor(spec), tokenizer=tokenizer, **processor_fields(spec))
    if name in VIDEO_FAMILIES.values():
        return build_image_processor(name, **parts)
    return getattr(transformers, name)(**parts)


def vocabulary_json(vocab: str) -> str:
    """The decompressed `tokenizer.json` text of a packaged vocabulary (llama2, llama3, mistral)."""
    path = VOCAB_DIR / f"{vocab}.tokenizer.json.xz"
    if not path.is_file():
        known = sorted(p.name.split(".")[0] for p in VOCAB_DIR.glob("*.tokenizer.json.xz"))
        raise FileNotFoundError(f"no packaged vocabulary {vocab!r} in {VOCAB_DIR}; known: {known}")
    return lzma.decompress(path.read_bytes()).decode("utf-8")
