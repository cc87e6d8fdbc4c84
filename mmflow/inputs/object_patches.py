"""Object patches: which image tokens come from pixels of the question's object boxes.

A white-on-black box mask goes through the model's own image processor (padding, resizing, anyres
tiles, dynamic resolution) and then through the model's own feature packing (unpadding, newline
tokens, OneVision's feature downsizing, Qwen2.5-VL's 2 x 2 patch merging), so every image token's
provenance is the model's, not a re-derivation (docs/method.md, "Token groups").
"""

from __future__ import annotations

import inspect

import torch
from PIL import Image, ImageDraw

from mmflow.data.sample import Box
from mmflow.inputs.encode import ModelInputs
from mmflow.models.registry import LoadedModel


def box_mask_image(size: tuple[int, int], boxes: tuple[Box, ...]) -> Image.Image:
    """White boxes on black, at the original image size: the mask that goes through preprocessing."""
    mask = Image.new("RGB", size, (0, 0, 0))
    draw = ImageDraw.Draw(mask)
    for box in boxes:
        draw.rectangle([box.x, box.y, box.x + box.w - 1, box.y + box.h - 1], fill=(255, 255, 255))
    return mask


PAPER_BOX_COLOUR = (255, 0, 0)  # the paper's create_mask_with_bbox: red boxes on green
PAPER_BACKGROUND = (0, 255, 0)


def paper_box_mask_image(size: tuple[int, int], boxes: tuple[Box, ...]) -> Image.Image:
    """The paper's mask: red boxes filled to PIL's inclusive end pixel (x, y, x+w, y+h) on green."""
    mask = Image.new("RGB", size, PAPER_BACKGROUND)
    draw = ImageDraw.Draw(mask)
    for box in boxes:
        x, y = int(box.x), int(box.y)
        draw.rectangle((x, y, x + int(box.w), y + int(box.h)), fill=PAPER_BOX_COLOUR)
    return mask


def box_pixels(
    loaded: LoadedModel, size: tuple[int, int], boxes: tuple[Box, ...]
) -> tuple[torch.Tensor, float]:
    """(pixel values of the box mask after preprocessing, red-channel threshold above which a pixel is box).

    Corrected rule: box pixels are white, the rest black; padding (mean colour or black) normalises to at
    most 0, so a pixel counts as box above half of white's normalised red value. `parity=paper`: the
    paper's mask (`paper_box_mask_image`) goes through the same preprocessing without rescaling or
    normalising, and a pixel counts when it is exactly red (returned as 1.0 in every channel).
    """
    image_processor = loaded.processor.image_processor
    if getattr(loaded, "parity", None) == "paper":
        if hasattr(image_processor, "merge_size"):
            raise ValueError("parity=paper is defined for the paper's LLaVA models only")
        mask = paper_box_mask_image(size, boxes)
        pixels = image_processor(mask, do_rescale=False, do_normalize=False, return_tensors="pt")[
            "pixel_values"
        ]
        red = torch.tensor(PAPER_BOX_COLOUR, dtype=pixels.dtype)[:, None, None]
        is_box = (pixels == red).all(dim=-3, keepdim=True)
        return is_box.expand_as(pixels).to(torch.float32), 0.5
    pixels = image_processor(box_mask_image(size, boxes), return_tensors="pt")["pixel_values"]
    return pixels, (1.0 - image_processor.image_mean[0]) / image_processor.image_std[0] / 2


def object_token_flags(
    loaded: LoadedModel, inputs: ModelInputs, boxes: tuple[Box, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(is_object, is_patch), bool [N] over the N image tokens in sequence order.

    `is_patch` is False for LLaVA-NeXT/OneVision newline tokens; `is_object` marks tokens whose patch
    (or, after OneVision's downsizing or Qwen2.5-VL's merging, any of whose source patches) holds a
    pixel that is box after preprocessing (`box_pixels`: the corrected or the paper's rule).
    """
    image_processor = loaded.processor.image_processor
    pixels, threshold = box_pixels(loaded, inputs.image_size, boxes)
    if hasattr(image_processor, "merge_size"):  # Qwen2-VL family: flat patches, merged in groups
        return _merged_flags(image_processor, pixels, threshold)
    overlap = _view_overlap(pixels, loaded.model.config.vision_config.patch_size, threshold)
    return _packed_flags(loaded, inputs, overlap)


def _view_overlap(pixels: torch.Tensor, patch: int, threshold: float) -> torch.Tensor:
    """Bool [views, patches per view] from pixel values [..., C, H, W] (views of one image).

    The patch grid is the vision tower's convolution: floor(H / patch) rows (SigLIP at 384 px with 14 px
    patches sees 27 x 27 patches and never the last 6 pixels).
    """
    red = pixels.reshape(-1, *pixels.shape[-3:])[:, 0]  # [views, H, W]
    views, height, width = red.shape
    rows, cols = height // patch, width // patch
    grid = red[:, : rows * patch, : cols * patch].reshape(views, rows, patch, cols, patch)
    return (grid > threshold).any(dim=(2, 4)).reshape(views, -1)


def _packed_flags(
    loaded: LoadedModel, inputs: ModelInputs, overlap: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Push per-patch features [object, is-patch] through the model's `pack_image_features`.

    Newline tokens get [0, 0]; OneVision's bilinear downsizing keeps is-patch at 1 and makes the object
    channel positive wherever a source patch overlaps the box.
    """
    features = torch.stack([overlap.double(), torch.ones_like(overlap, dtype=torch.float64)], dim=-1)
    inner = loaded.model.model
    if not hasattr(inner, "pack_image_features"):  # LLaVA-1.5: one view, tokens in patch order
        flat = features.reshape(-1, 2)
    else:
        kwargs = {"image_newline": torch.zeros(2, dtype=torch.float64)}
        parameters = inspect.signature(inner.pack_image_features).parameters
        if "vision_aspect_ratio" in parameters:  # LLaVA-OneVision
            kwargs["vision_aspect_ratio"] = loaded.model.config.vision_aspect_ratio
        else:  # LLaVA-NeXT
            kwargs["vision_feature_select_strategy"] = loaded.model.config.vision_feature_select_strategy
        packed, _ = inner.pack_image_features([features], inputs.tensors["image_sizes"].cpu(), **kwargs)
        flat = (torch.cat(packed) if isinstance(packed, list | tuple) else packed).reshape(-1, 2)
    is_patch = flat[:, 1] > 0.5
    return is_patch & (flat[:, 0] > 1e-6), is_patch


def _merged_flags(
    image_processor, pixels: torch.Tensor, threshold: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen2-VL / Qwen2.5-VL: pixel rows [patches, C * T * p * p] in merge-group order -> merged tokens.

    The processor orders patches (t, h / m, w / m, m, m), and the vision tower's merger concatenates
    each run of m * m consecutive patches into one token, so token k holds patches k m^2 .. (k+1) m^2 - 1.
    """
    patch, temporal = image_processor.patch_size, image_processor.temporal_patch_size
    group = image_processor.merge_size**2
    red = pixels.reshape(pixels.shape[0], -1, temporal, patch, patch)[:, 0]  # [patches, T, p, p]
    overlap = (red > threshold).flatten(1).any(-1)
    is_object = overlap.reshape(-1, group).any(-1)
    return is_object, torch.ones_like(is_object)
