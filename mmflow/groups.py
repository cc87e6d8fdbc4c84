"""`TokenGroups`: which sequence positions are Image, Question, Last, object patches, options.

Text spans come from the tokenizer's character offsets (never string search over token pieces);
object patches come from pushing a box mask through the model's own image preprocessing and
feature packing, so the positions are right for LLaVA-1.5 (pad) and LLaVA-NeXT (anyres) alike.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, fields

import torch
from PIL import Image, ImageDraw

from mmflow.data.sample import Box, Sample
from mmflow.inputs import ModelInputs
from mmflow.models.registry import LoadedModel

GROUP_NAMES = ("image", "question", "last", "object", "nonobject", "true_option", "false_option")


class GroupError(ValueError):
    """A token group could not be built for a sample; `reason` is the recorded skip reason."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class TokenGroups:
    """Sorted position tensors (long) of each group; option groups are empty outside Choose tasks."""

    image: torch.Tensor
    question: torch.Tensor
    last: torch.Tensor
    object: torch.Tensor
    nonobject: torch.Tensor
    true_option: torch.Tensor
    false_option: torch.Tensor

    def get(self, name: str) -> torch.Tensor:
        if name not in GROUP_NAMES:
            raise KeyError(f"unknown token group {name!r}; known: {GROUP_NAMES}")
        return getattr(self, name)

    def require(self, name: str) -> torch.Tensor:
        """The group's positions, or a `GroupError('empty_group', ...)` if it has none."""
        positions = self.get(name)
        if positions.numel() == 0:
            raise GroupError("empty_group", f"token group {name!r} is empty for this sample")
        return positions

    def to_json(self) -> str:
        return json.dumps({f.name: getattr(self, f.name).tolist() for f in fields(self)})


def _expanded_span(inputs: ModelInputs, span: tuple[int, int]) -> tuple[int, int]:
    """Map a character span of the prompt to the processor's expanded text (image tokens inserted)."""
    shift = 0
    for rep in inputs.replacements:
        (old_start, old_end), (new_start, new_end) = rep["span"], rep["new_span"]
        if old_end <= span[0]:
            shift += (new_end - new_start) - (old_end - old_start)
    return span[0] + shift, span[1] + shift


def tokens_in_span(inputs: ModelInputs, span: tuple[int, int]) -> torch.Tensor:
    """Positions of the tokens whose character offsets overlap the prompt span (start, end)."""
    start, end = _expanded_span(inputs, span)
    starts, ends = inputs.offsets[:, 0], inputs.offsets[:, 1]
    hit = (starts < end) & (ends > start) & (ends > starts)
    return torch.nonzero(hit).flatten()


def _word_span(text: str, word: str, base: int) -> tuple[int, int] | None:
    match = re.search(rf"(?<!\w){re.escape(word)}(?!\w)", text, flags=re.IGNORECASE)
    return None if match is None else (base + match.start(), base + match.end())


def box_mask_image(size: tuple[int, int], boxes: tuple[Box, ...]) -> Image.Image:
    """White boxes on black, at the original image size: the mask that goes through preprocessing."""
    mask = Image.new("RGB", size, (0, 0, 0))
    draw = ImageDraw.Draw(mask)
    for box in boxes:
        draw.rectangle([box.x, box.y, box.x + box.w - 1, box.y + box.h - 1], fill=(255, 255, 255))
    return mask


def patch_box_overlap(loaded: LoadedModel, size: tuple[int, int], boxes: tuple[Box, ...]) -> torch.Tensor:
    """Bool [n_views, patches_per_view]: the patch holds a pixel that is mostly box after preprocessing.

    Box pixels are white, the rest black; padding (mean colour for `pad`, black for anyres tiles)
    normalises to at most 0, so a pixel counts as box above half of white's normalised value.
    """
    image_processor = loaded.processor.image_processor
    pixels = image_processor(box_mask_image(size, boxes), return_tensors="pt")["pixel_values"]
    pixels = pixels.reshape(-1, *pixels.shape[-3:])[:, 0]  # [views, H, W], red channel
    white = (1.0 - image_processor.image_mean[0]) / image_processor.image_std[0]
    patch = loaded.model.config.vision_config.patch_size
    views, height, width = pixels.shape
    grid = pixels.reshape(views, height // patch, patch, width // patch, patch)
    return (grid > white / 2).any(dim=(2, 4)).reshape(views, -1)


def image_token_patch_ids(
    loaded: LoadedModel, inputs: ModelInputs, n_views: int, per_view: int
) -> torch.Tensor:
    """For each image token in order: the flat (view, patch) index it comes from, or -1 for a newline.

    Uses the model's own `pack_image_features` on a feature tensor that carries patch ids, so anyres
    tiling, unpadding and newline tokens are exactly the model's.
    """
    ids = torch.arange(n_views * per_view, dtype=torch.float64).reshape(n_views, per_view, 1)
    inner = loaded.anatomy.backbone
    if not hasattr(inner, "pack_image_features"):
        return ids.flatten().long()
    packed, _ = inner.pack_image_features(
        [ids],
        inputs.tensors["image_sizes"].cpu(),
        vision_feature_select_strategy=loaded.model.config.vision_feature_select_strategy,
        image_newline=torch.tensor([-1.0], dtype=torch.float64),
    )
    return packed[0].flatten().round().long()


def build_token_groups(loaded: LoadedModel, inputs: ModelInputs, sample: Sample) -> TokenGroups:
    """All groups for one sample; raises `GroupError` with a skip reason when the method cannot apply."""
    ids = inputs.input_ids.cpu()
    image_token_id = loaded.model.config.image_token_id
    image = torch.nonzero(ids == image_token_id).flatten()
    question = tokens_in_span(inputs, inputs.prompt.question_span)
    if image.numel() == 0:
        raise GroupError("empty_group", "no image tokens in the input")
    if question.numel() == 0:
        raise GroupError("question_not_found", f"question {sample.question!r} has no tokens in the prompt")
    if torch.isin(question, image).any():
        raise GroupError("overlapping_groups", "question tokens overlap image tokens")

    overlap = patch_box_overlap(loaded, inputs.image_size, sample.object_boxes)
    patch_ids = image_token_patch_ids(loaded, inputs, *overlap.shape)
    if patch_ids.numel() != image.numel():
        raise GroupError(
            "image_packing_mismatch", f"{patch_ids.numel()} packed features vs {image.numel()} image tokens"
        )
    real = patch_ids >= 0
    is_object = torch.zeros_like(real)
    is_object[real] = overlap.flatten()[patch_ids[real]]
    q_start = inputs.prompt.question_span[0]
    options = {}
    for name, word in (("true_option", sample.true_option), ("false_option", sample.false_option)):
        span = _word_span(sample.question, word, q_start) if word else None
        options[name] = tokens_in_span(inputs, span) if span else torch.empty(0, dtype=torch.long)
    return TokenGroups(
        image=image,
        question=question,
        last=torch.tensor([ids.shape[0] - 1]),
        object=image[is_object],
        nonobject=image[real & ~is_object],
        **options,
    )
