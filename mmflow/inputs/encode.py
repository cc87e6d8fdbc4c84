"""Sample -> model inputs: the paper's prompt through the model's own processor."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image

from mmflow.data.sample import Sample
from mmflow.errors import TokenizationError
from mmflow.inputs.images import to_rgb
from mmflow.inputs.prompts import IMAGE_PLACEHOLDER, Prompt, build_prompt
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
    """The sample's image as 8-bit RGB, whatever its PIL mode (`mmflow.inputs.images.to_rgb`; raises
    `ImageModeError` for a mode that cannot be converted faithfully)."""
    with Image.open(sample.image_path) as image:
        return to_rgb(image)


def _model_tensors(loaded: LoadedModel, encoded) -> dict[str, torch.Tensor]:
    """The model's input tensors on its device, floating ones in its dtype."""
    tensors = {}
    for key in MODEL_KEYS:
        if key in encoded:
            value = encoded[key].to(loaded.device)
            tensors[key] = value.to(loaded.model.dtype) if value.is_floating_point() else value
    return tensors


def encode(loaded: LoadedModel, sample: Sample, image: Image.Image | None = None) -> ModelInputs:
    """Build the prompt for `sample` and run the processor on it and its image.

    Models the paper ran (`loaded.parity` set) are tokenized as the original LLaVA code does
    (`encode_chunked`); others (tiny, toy) through their processor in one piece.
    """
    image = image if image is not None else load_image(sample)
    prompt = build_prompt(loaded.prompt_format, sample.question, loaded.parity)
    if loaded.parity is not None:
        return encode_chunked(loaded, prompt, image)
    encoded = loaded.processor(
        text=prompt.text,
        images=image,
        return_tensors="pt",
        return_offsets_mapping=True,
        return_text_replacement_offsets=True,
        add_special_tokens=prompt.add_bos,
    )
    return ModelInputs(
        prompt=prompt,
        tensors=_model_tensors(loaded, encoded),
        offsets=encoded["offset_mapping"][0],
        replacements=list(encoded["text_replacement_offsets"][0]),
        image_size=image.size,
    )


def _vicuna_image_join(tokenizer) -> list[int]:
    """The ids the original code puts right after the image in a Vicuna prompt: "▁" then "\\n"."""
    ids = [tokenizer.convert_tokens_to_ids(t) for t in ("▁", "<0x0A>")]
    if tokenizer.unk_token_id in ids or None in ids:
        raise TokenizationError(
            f"this tokenizer has no '▁'/'<0x0A>' tokens ({ids}), so it cannot give the original LLaVA "
            "ids after the image ('▁' 29871, '\\n' 13 in Vicuna): not a Llama SentencePiece vocabulary"
        )
    return ids


def encode_chunked(loaded: LoadedModel, prompt: Prompt, image: Image.Image) -> ModelInputs:
    """Input ids as the original LLaVA `tokenizer_image_token` builds them, whatever the normaliser.

    The text before and after the image placeholder is tokenized separately (BOS only on the
    first piece, as `prompt.add_bos` says), so the piece after the image starts with the
    SentencePiece "▁" even under a Metaspace `prepend_scheme="first"` tokenizer, which drops it
    when the prompt is tokenized in one piece. The image tokens are the processor's expansion.
    Offsets index `prompt.text` directly (image tokens are zero-width), so `replacements` is empty.
    Raises `TokenizationError` if a Vicuna prompt's ids after the image are not "▁", "\\n".
    """
    processor, tokenizer = loaded.processor, loaded.processor.tokenizer
    before, after = prompt.text.split(IMAGE_PLACEHOLDER)
    image_part = processor(
        text=IMAGE_PLACEHOLDER, images=image, return_tensors="pt", add_special_tokens=False
    )
    image_ids = image_part["input_ids"][0]
    first = tokenizer(before, add_special_tokens=prompt.add_bos, return_offsets_mapping=True)
    second = tokenizer(after, add_special_tokens=False, return_offsets_mapping=True)
    if loaded.prompt_format == "vicuna_v1":
        expected = _vicuna_image_join(tokenizer)
        if second["input_ids"][:2] != expected:
            raise TokenizationError(
                f"the text after the image tokenizes to {second['input_ids'][:2]}, not {expected} as in the "
                "original LLaVA code: the tokenizer does not prepend '▁' to a piece that starts with '\\n'"
            )
    shift = len(before) + len(IMAGE_PLACEHOLDER)
    offsets = (
        [tuple(o) for o in first["offset_mapping"]]
        + [(len(before), len(before))] * len(image_ids)
        + [(a + shift, b + shift) for a, b in second["offset_mapping"]]
    )
    ids = torch.tensor([first["input_ids"] + image_ids.tolist() + second["input_ids"]])
    encoded = {**image_part, "input_ids": ids, "attention_mask": torch.ones_like(ids)}
    return ModelInputs(
        prompt=prompt,
        tensors=_model_tensors(loaded, encoded),
        offsets=torch.tensor(offsets, dtype=torch.long),
        replacements=[],
        image_size=image.size,
    )
