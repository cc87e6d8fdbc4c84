"""The `Sample` schema every data source produces, and the per-sample skip record."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

TASKS: tuple[str, ...] = (
    "ChooseAttr",
    "ChooseCat",
    "ChooseRel",
    "CompareAttr",
    "LogicalObj",
    "QueryAttr",
)
CHOOSE_TASKS: frozenset[str] = frozenset({"ChooseAttr", "ChooseCat", "ChooseRel"})


@dataclass(frozen=True)
class Box:
    """An object box in pixels of the original image (GQA convention: x, y, width, height)."""

    x: float
    y: float
    w: float
    h: float

    def inside(self, width: int, height: int) -> bool:
        return (
            self.w > 0
            and self.h > 0
            and self.x >= 0
            and self.y >= 0
            and self.x + self.w <= width + 1e-6
            and self.y + self.h <= height + 1e-6
        )


@dataclass(frozen=True)
class Sample:
    """One VQA question with everything the token groups need."""

    question_id: str
    task: str
    image_path: Path
    question: str
    answer: str
    image_size: tuple[int, int]  # (width, height) of the original image
    object_names: tuple[str, ...] = ()
    object_boxes: tuple[Box, ...] = ()
    true_option: str | None = None
    false_option: str | None = None
    extra: dict = field(default_factory=dict, compare=False)
    # (skip reason, detail) when the object boxes cannot be used (e.g. a box outside the image): only
    # what needs object patches skips the sample; everything else still scores it.
    box_issue: tuple[str, str] | None = None


ERRORED = "errored"  # samples.parquet status of a sample an exception stopped (retried by the next run)


@dataclass(frozen=True)
class Skip:
    """A sample that could not be used, with the reason (recorded, never silently dropped).

    `error=False`: the row's own content (missing or unreadable image, malformed row, empty group, ...)
    is the reason; the skip is final. `error=True`: an exception from code, config or environment (a
    processor config without `patch_size`, out of memory, ...); the sample is recorded as `errored`,
    its cell is not done, and the next run computes it again.
    """

    question_id: str
    reason: str
    detail: str = ""
    error: bool = False
