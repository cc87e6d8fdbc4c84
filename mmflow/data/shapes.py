"""Synthetic GQA-style VQA over coloured shapes: the project's default data, no download needed.

Each question gets its own scene (2-4 non-overlapping shapes on a light background, image sizes
with the aspect ratios of real GQA photos, since LLaVA-NeXT picks its anyres grid by aspect ratio).
Questions follow the six GQA families with single-word lower-case answers that are correct by
construction; referents ("the circle", "the red object") are unique in their scene. The output is
a folder of real JPEGs plus a CSV in the GQA column schema, read back by the same parser as GQA.
"""

from __future__ import annotations

import csv
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from mmflow.data.gqa import GQA_TASKS_DIR, NO_VALUE, DataError, object_prefixes, read_task_csv
from mmflow.data.sample import TASKS, Sample, Skip

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
JPEG_QUALITY = 95
CSV_NAME = "questions.csv"
IMAGES_DIR = "images"


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


@dataclass(frozen=True)
class Item:
    """One generated question: its scene and its CSV row (GQA column names)."""

    scene: Scene
    row: dict[str, str]


def answer_vocabulary() -> list[str]:
    """Every answer and option word the six shapes families can produce, sorted."""
    return sorted({*COLORS, *SHAPES, *SIZES, *RELATIONS, *YES_NO})


# ---------------------------------------------------------------- scenes


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


# ---------------------------------------------------------------- questions
# Each maker returns the question fields, or None when the scene cannot support an unambiguous
# question (the caller then draws a new scene). `yes` is the item's yes/no target, drawn once per
# item so that retries cannot bias the balance; only the yes/no families use it.


def _other(rng: random.Random, pool: tuple[str, ...], exclude: str) -> str:
    return rng.choice([v for v in pool if v != exclude])


def _a(word: str) -> str:
    """The word with its indefinite article ("a circle", "an orange")."""
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def _ordered(rng: random.Random, a: str, b: str) -> tuple[str, str]:
    return (a, b) if rng.random() < 0.5 else (b, a)


def _q_choose_attr(rng: random.Random, scene: Scene, yes: bool) -> dict | None:
    candidates = unique(scene, "shape")
    if not candidates:
        return None
    o = rng.choice(candidates)
    if rng.random() < 0.75:
        true, false, kind = o.color, _other(rng, COLORS, o.color), "chooseColor"
    else:
        true, false, kind = o.size, _other(rng, SIZES, o.size), "chooseSize"
    a, b = _ordered(rng, true, false)
    q = f"Is the {o.shape} {a} or {b}?"
    return {"question": q, "answer": true, "true": true, "false": false, "type": kind, "objs": [(o.shape, o)]}


def _q_choose_cat(rng: random.Random, scene: Scene, yes: bool) -> dict | None:
    candidates = unique(scene, "color")
    if not candidates:
        return None
    o = rng.choice(candidates)
    false = _other(rng, SHAPES, o.shape)
    a, b = _ordered(rng, o.shape, false)
    q = f"Is the {o.color} object {_a(a)} or {_a(b)}?"
    return {
        "question": q,
        "answer": o.shape,
        "true": o.shape,
        "false": false,
        "type": "categoryChoose",
        "objs": [("object", o)],
    }


def _separated(a: Obj, b: Obj) -> bool:
    """True when the x-ranges are disjoint, so left/right is unambiguous."""
    return a.box[0] + a.box[2] <= b.box[0] or b.box[0] + b.box[2] <= a.box[0]


def _q_choose_rel(rng: random.Random, scene: Scene, yes: bool) -> dict | None:
    cands = unique(scene, "shape")
    pairs = [(a, b) for a in cands for b in cands if a is not b and _separated(a, b)]
    if not pairs:
        return None
    a, b = rng.choice(pairs)
    true = "left" if a.center_x < b.center_x else "right"
    false = _other(rng, RELATIONS, true)
    r1, r2 = _ordered(rng, true, false)
    q = f"Is the {a.shape} to the {r1} or to the {r2} of the {b.shape}?"
    return {
        "question": q,
        "answer": true,
        "true": true,
        "false": false,
        "type": "relChooser",
        "objs": [(a.shape, a), (b.shape, b)],
    }


def _q_compare_attr(rng: random.Random, scene: Scene, yes: bool) -> dict | None:
    cands = unique(scene, "shape")
    if len(cands) < 2:
        return None
    attr = "color" if rng.random() < 0.7 else "size"
    pairs = [
        (a, b) for a in cands for b in cands if a is not b and (getattr(a, attr) == getattr(b, attr)) == yes
    ]
    if not pairs:
        return None
    a, b = rng.choice(pairs)
    q = f"Do the {a.shape} and the {b.shape} have the same {attr}?"
    return {
        "question": q,
        "answer": "yes" if yes else "no",
        "type": f"same{attr.title()}",
        "objs": [(a.shape, a), (b.shape, b)],
    }


def _q_logical_obj(rng: random.Random, scene: Scene, yes: bool) -> dict | None:
    """GQA-style "or" existence: object1 is the scene's only `shape1` (present, maybe filtered out
    by colour); object2 is the only `shape2` if the scene has one, else absent ('-' fields)."""
    cands = unique(scene, "shape")
    if not cands:
        return None
    o1 = rng.choice(cands)
    shape2 = _other(rng, SHAPES, o1.shape)
    same_shape2 = [o for o in scene.objects if o.shape == shape2]
    if len(same_shape2) > 1:
        return None
    o2 = same_shape2[0] if same_shape2 else None
    if not yes:
        m1 = m2 = False
    elif o2 is None:
        m1, m2 = True, False
    else:
        m1, m2 = rng.choice([(True, False), (False, True), (True, True)])
    c1 = o1.color if m1 else _other(rng, COLORS, o1.color)
    c2 = o2.color if m2 else _other(rng, COLORS, o2.color if o2 else "")
    q = f"Is there {_a(c1)} {o1.shape} or {_a(c2)} {shape2}?"
    return {
        "question": q,
        "answer": "yes" if yes else "no",
        "type": "existOr",
        "objs": [(o1.shape, o1), (shape2, o2)],
    }


def _q_query_attr(rng: random.Random, scene: Scene, yes: bool) -> dict | None:
    cands = unique(scene, "shape")
    if not cands:
        return None
    o = rng.choice(cands)
    return {
        "question": f"What color is the {o.shape}?",
        "answer": o.color,
        "type": "colorQuery",
        "objs": [(o.shape, o)],
    }


QUESTION_MAKERS = {
    "ChooseAttr": _q_choose_attr,
    "ChooseCat": _q_choose_cat,
    "ChooseRel": _q_choose_rel,
    "CompareAttr": _q_compare_attr,
    "LogicalObj": _q_logical_obj,
    "QueryAttr": _q_query_attr,
}


def _id_width(n: int) -> int:
    return max(6, len(str(max(n - 1, 0))))


def _row(task: str, index: int, n: int, scene: Scene, q: dict) -> dict[str, str]:
    ident = f"{index:0{_id_width(n)}d}"
    row = {
        "question_id": ident,
        "img_id": ident,
        "question": q["question"],
        "answer": q["answer"],
        "image_w": str(scene.width),
        "image_h": str(scene.height),
        "type_detailed": q["type"],
    }
    if "true" in q:
        row["true option"], row["false option"] = q["true"], q["false"]
    for prefix, (name, obj) in zip(object_prefixes(task), q["objs"], strict=True):
        row[f"{prefix} name"] = name
        for key, value in zip("xywh", obj.box if obj else (NO_VALUE,) * 4, strict=True):
            row[f"{prefix} {key}"] = str(value)
    return row


def make_item(task: str, seed: int, index: int, n: int) -> Item:
    """Question `index` of a (task, seed) set; independent of the other items, so any n is a prefix."""
    if task not in QUESTION_MAKERS:
        raise DataError(f"unknown task {task!r}; valid tasks: {', '.join(TASKS)}")
    rng = random.Random(f"shapes:{task}:{seed}:{index}")
    yes = rng.random() < 0.5  # drawn once per item: the scene retries below must not bias yes/no
    while True:
        scene = random_scene(rng)
        q = QUESTION_MAKERS[task](rng, scene, yes)
        if q is not None:
            return Item(scene, _row(task, index, n, scene, q))


def make_items(task: str, n: int, seed: int) -> list[Item]:
    """The n questions of a (task, seed) set, with their scenes."""
    return [make_item(task, seed, i, n) for i in range(n)]


# ---------------------------------------------------------------- files


def _header(task: str) -> list[str]:
    """The real GQA file's header for this task, so synthetic CSVs share its exact schema."""
    with (GQA_TASKS_DIR / f"{task}.csv").open(newline="", encoding="utf-8-sig") as f:
        return next(csv.reader(f))


def _write(folder: Path, task: str, items: list[Item]) -> None:
    (folder / IMAGES_DIR).mkdir(parents=True)
    header = _header(task)
    with (folder / CSV_NAME).open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=header, restval="", extrasaction="raise", lineterminator="\n")
        writer.writeheader()
        for item in items:
            writer.writerow(item.row)
    for item in items:
        path = folder / IMAGES_DIR / f"{item.row['img_id']}.jpg"
        draw(item.scene).save(path, format="JPEG", quality=JPEG_QUALITY)


def generate_shapes(out_dir: Path, task: str, n: int, seed: int) -> Path:
    """Write (or reuse) `out_dir/<task>_seed<seed>_n<n>/` with images/ and questions.csv.

    Built in a temporary sibling folder and renamed into place, so an existing folder is complete.
    """
    if task not in TASKS:
        raise DataError(f"unknown task {task!r}; valid tasks: {', '.join(TASKS)}")
    if n < 0:
        raise DataError(f"n must be >= 0, got {n}")
    out_dir = Path(out_dir).expanduser()
    final = out_dir / f"{task}_seed{seed}_n{n}"
    if (final / CSV_NAME).is_file():
        return final
    if final.exists():  # not produced by this function (it only renames complete folders)
        shutil.rmtree(final)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=out_dir))
    try:
        _write(tmp, task, make_items(task, n, seed))
        os.replace(tmp, final)
    except OSError:
        if not (final / CSV_NAME).is_file():  # a concurrent writer finishing first is fine
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def default_cache_dir() -> Path:
    """`$MMFLOW_CACHE/shapes` if set, else `~/.cache/mmflow/shapes`."""
    root = os.environ.get("MMFLOW_CACHE")
    return Path(root).expanduser() / "shapes" if root else Path.home() / ".cache" / "mmflow" / "shapes"


def load_shapes(
    task: str, n_samples: int, seed: int = 0, cache_dir: str | Path | None = None
) -> list[Sample | Skip]:
    """Generate (cached) and read a synthetic set through the GQA parser."""
    folder = generate_shapes(Path(cache_dir) if cache_dir else default_cache_dir(), task, n_samples, seed)
    return read_task_csv(folder / CSV_NAME, task, folder / IMAGES_DIR)
