"""The scenes of the synthetic shapes set: 2-4 coloured shapes on a light background, placed without
overlap, drawn so that each shape exactly fills its box (`mmflow.data.shapes` asks the questions).

Image sizes have the aspect ratios of real GQA photos, since LLaVA-NeXT picks its anyres grid by
aspect ratio.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

COLORS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange")
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
SIZES: tuple[str, ...] = ("small", "large")
RELATIONS: tuple[str, ...] = ("left", "right")
YES_NO: tuple[str, ...] = ("yes", "no")

RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 205, 20),
    "purple": (140, 60, 180),
    "orange": (245, 135, 25),
}
BACKGROUNDS: tuple[tuple[int, int, int], ...] = (
    (245, 245, 240),
    (236, 236, 236),
    (250, 244, 228),
    (238, 243, 250),
)
OUTLINE = (50, 50, 50)
# (width, height) of typical GQA / Visual Genome photos: landscape, portrait and square.
IMAGE_SIZES: tuple[tuple[int, int], ...] = (
    (500, 375),
    (375, 500),
    (500, 333),
    (333, 500),
    (640, 480),
    (448, 448),
)
# Object side as a fraction of the image's shorter side; the gap keeps small/large unmistakable.
SIDE_FRACTION: dict[str, tuple[float, float]] = {"small": (0.10, 0.14), "large": (0.24, 0.30)}
GAP_PX = 10


@dataclass(frozen=True)
class Obj:
    """One drawn shape; `box` is its tight pixel box (x, y, w, h)."""

    shape: str
    color: str
    size: str
    box: tuple[int, int, int, int]

    @property
    def center_x(self) -> float:
        return self.box[0] + self.box[2] / 2


@dataclass(frozen=True)
class Scene:
    """Everything needed to draw an image and to re-derive its answers."""

    width: int
    height: int
    background: tuple[int, int, int]
    objects: tuple[Obj, ...]


def _overlaps(a: tuple[int, int, int, int], b: tuple[int, int, int, int], gap: int) -> bool:
    return not (
        a[0] + a[2] + gap <= b[0]
        or b[0] + b[2] + gap <= a[0]
        or a[1] + a[3] + gap <= b[1]
        or b[1] + b[3] + gap <= a[1]
    )


def _place(rng: random.Random, width: int, height: int, side: int, taken: list) -> tuple | None:
    """A random box of the given side that keeps GAP_PX from every taken box, or None."""
    for _ in range(100):
        box = (
            rng.randint(GAP_PX, width - side - GAP_PX),
            rng.randint(GAP_PX, height - side - GAP_PX),
            side,
            side,
        )
        if not any(_overlaps(box, t, GAP_PX) for t in taken):
            return box
    return None


def random_scene(rng: random.Random) -> Scene:
    """2-4 shapes with distinct (shape, colour) pairs, non-overlapping, fully inside the image."""
    while True:
        width, height = rng.choice(IMAGE_SIZES)
        n = rng.randint(2, 4)
        kinds = rng.sample([(s, c) for s in SHAPES for c in COLORS], n)
        objects: list[Obj] = []
        for shape, color in kinds:
            size = rng.choice(SIZES)
            lo, hi = SIDE_FRACTION[size]
            side = round(rng.uniform(lo, hi) * min(width, height))
            box = _place(rng, width, height, side, [o.box for o in objects])
            if box is None:
                break
            objects.append(Obj(shape, color, size, box))
        else:
            return Scene(width, height, rng.choice(BACKGROUNDS), tuple(objects))


def unique(scene: Scene, attr: str) -> list[Obj]:
    """Objects whose value of `attr` no other object in the scene shares (unambiguous referents)."""
    values = [getattr(o, attr) for o in scene.objects]
    return [o for o in scene.objects if values.count(getattr(o, attr)) == 1]


def draw(scene: Scene) -> Image.Image:
    """Render the scene; each shape exactly fills its box."""
    image = Image.new("RGB", (scene.width, scene.height), scene.background)
    pen = ImageDraw.Draw(image)
    for o in scene.objects:
        x, y, w, h = o.box
        x1, y1, cx, cy = x + w - 1, y + h - 1, x + (w - 1) / 2, y + (h - 1) / 2
        style = {"fill": RGB[o.color], "outline": OUTLINE, "width": 2}
        if o.shape == "circle":
            pen.ellipse((x, y, x1, y1), **style)
        elif o.shape == "square":
            pen.rectangle((x, y, x1, y1), **style)
        elif o.shape == "triangle":
            pen.polygon([(cx, y), (x1, y1), (x, y1)], **style)
        else:  # diamond
            pen.polygon([(cx, y), (x1, cy), (cx, y1), (x, cy)], **style)
    return image
