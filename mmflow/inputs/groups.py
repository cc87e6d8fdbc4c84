"""`TokenGroups`: which sequence positions are Image, Question, Last, object patches, options.

Text spans come from the tokenizer's character offsets (never string search over token pieces);
object patches come from pushing a box mask through the model's own image preprocessing and
feature packing (`mmflow.inputs.object_patches`), so the positions are right for every supported family.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

import torch

from mmflow.data.sample import Sample
from mmflow.errors import GroupError
from mmflow.inputs.encode import ModelInputs
from mmflow.inputs.object_patches import object_token_flags
from mmflow.models.registry import LoadedModel

GROUP_NAMES = ("image", "question", "last", "object", "nonobject", "true_option", "false_option")
OBJECT_GROUPS = ("object", "nonobject")


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
    # group -> (skip reason, detail) for groups this sample cannot have (object patches of a bad box)
    unusable: dict[str, tuple[str, str]] = field(default_factory=dict)

    def get(self, name: str) -> torch.Tensor:
        if name not in GROUP_NAMES:
            raise KeyError(f"unknown token group {name!r}; known: {GROUP_NAMES}")
        return getattr(self, name)

    def require(self, name: str) -> torch.Tensor:
        """The group's positions; a `GroupError` with the reason if it is unusable or empty."""
        if name in self.unusable:
            raise GroupError(*self.unusable[name])
        positions = self.get(name)
        if positions.numel() == 0:
            raise GroupError("empty_group", f"token group {name!r} is empty for this sample")
        return positions

    def to_json(self) -> str:
        return json.dumps({name: getattr(self, name).tolist() for name in GROUP_NAMES})


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

    if sample.box_issue is not None:
        empty = torch.empty(0, dtype=torch.long)
        patches = {"object": empty, "nonobject": empty}
    else:
        patches = _object_patches(loaded, inputs, sample, image)
    q_start = inputs.prompt.question_span[0]
    options = {}
    for name, word in (("true_option", sample.true_option), ("false_option", sample.false_option)):
        span = _word_span(sample.question, word, q_start) if word else None
        options[name] = tokens_in_span(inputs, span) if span else torch.empty(0, dtype=torch.long)
    return TokenGroups(
        image=image,
        question=question,
        last=torch.tensor([ids.shape[0] - 1]),
        **patches,
        **options,
        unusable={name: sample.box_issue for name in OBJECT_GROUPS} if sample.box_issue else {},
    )


def _object_patches(loaded: LoadedModel, inputs: ModelInputs, sample: Sample, image: torch.Tensor) -> dict:
    """The object and non-object image-token positions of the sample's boxes (newline tokens in neither)."""
    is_object, real = object_token_flags(loaded, inputs, sample.object_boxes)
    if is_object.numel() != image.numel():
        raise GroupError(
            "image_packing_mismatch", f"{is_object.numel()} packed features vs {image.numel()} image tokens"
        )
    return {"object": image[is_object], "nonobject": image[real & ~is_object]}
