"""Processors for image-only use: OneVision's and Qwen2.5-VL's without their video part.

The stock `LlavaOnevisionProcessor` and `Qwen2_5_VLProcessor` insist on a video processor, and video
processors need torchvision, which mmflow does not otherwise use. mmflow feeds single images only, so
it loads these processors with the video attribute left out (`video_processor` is None); the saved
files keep the stock class names, so a stock `AutoProcessor` (with torchvision) loads them too.
"""

from __future__ import annotations

from functools import cache

from transformers import AutoProcessor

VIDEO_FAMILIES = {
    "LlavaOnevisionForConditionalGeneration": "LlavaOnevisionProcessor",
    "Qwen2_5_VLForConditionalGeneration": "Qwen2_5_VLProcessor",
}


@cache
def image_only(processor_class: str) -> type:
    """A subclass of transformers' `processor_class` without its video processor attribute."""
    import transformers

    base = getattr(transformers, processor_class)

    class ImageOnly(base):
        video_processor = None

        @classmethod
        def get_attributes(cls) -> list[str]:
            return [name for name in super().get_attributes() if name != "video_processor"]

    ImageOnly.__name__ = ImageOnly.__qualname__ = processor_class  # saved configs name the stock class
    return ImageOnly


def build_image_processor(processor_class: str, **parts):
    """`processor_class(**parts)` without a video processor (parts: image_processor, tokenizer, ...)."""
    return image_only(processor_class)(**parts)


def load_processor(path: str, model_class: str, **kwargs):
    """The model family's processor from `path`: image-only for families that also take video."""
    if model_class in VIDEO_FAMILIES:
        return image_only(VIDEO_FAMILIES[model_class]).from_pretrained(path, **kwargs)
    return AutoProcessor.from_pretrained(path, **kwargs)
