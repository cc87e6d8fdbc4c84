"""Sample -> model inputs: the paper's prompt through the model's own processor."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image

from mmflow.data.sample import Sample
from mmflow.models.prompts import Prompt, build_prompt
from mmflow.models.registry import LoadedModel

# What the supported families' forwards take; Qwen2.5-VL needs `mm_token_type_ids` and `image_grid_thw`
# to build its multimodal rotary positions (without them it would silently use 1-D positions).
MODEL_KEYS = (
    "input_ids",
    "attention_mask",
    "pixel_values",
    "image_sizes",
    "image_grid_thw",
    "mm_token_type_ids",
    "batch_num_images",
)


@dataclass
class ModelInputs:
    """Tensors for the model plus what is needed to map characters of the prompt to token positions."""

    prompt: Prompt
    tensors: dict[str, torch.Tensor]  # batch of one, on the model's device
    offsets: torch.Tensor  # [T, 2] character offsets into the expanded text
    replacements: list[dict]  # image placeholder -> expanded text spans, from the processor
    image_size: tuple[int, int]  # (width, height) of the image as loaded

    @property
    def input_ids(self) -> torch.Tensor:
        return self.tensors["input_ids"][0]

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[0])


def load_image(sample: Sample) -> Image.Image:
    with Image.open(sample.image_path) as image:
        return image.convert("RGB")


def encode(loaded: LoadedModel, sample: Sample, image: Image.Image | None = None) -> ModelInputs:
    """Build the prompt for `sample` and run the processor on it and its image."""
    image = image if image is not None else load_image(sample)
    prompt = build_prompt(loaded.prompt_format, sample.question)
    encoded = loaded.processor(
        text=prompt.text,
        images=image,
        return_tensors="pt",
        return_offsets_mapping=True,
        return_text_replacement_offsets=True,
        add_special_tokens=prompt.add_bos,
    )
    dtype = loaded.model.dtype
    tensors = {}
    for key in MODEL_KEYS:
        if key in encoded:
            value = encoded[key].to(loaded.device)
            tensors[key] = value.to(dtype) if value.is_floating_point() else value
    return ModelInputs(
        prompt=prompt,
        tensors=tensors,
        offsets=encoded["offset_mapping"][0],
        replacements=list(encoded["text_replacement_offsets"][0]),
        image_size=image.size,
    )
