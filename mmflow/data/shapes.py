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
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmflow.config.paths import expand_path
from mmflow.data.gqa import GQA_TASKS_DIR, NO_VALUE, object_prefixes, read_task_csv
from mmflow.data.sample import TASKS, Sample, Skip
from mmflow.data.scenes import (
    COLORS,
    RELATIONS,
    SHAPES,
    SIZES,
    YES_NO,
    Obj,
    Scene,
    draw,
    random_scene,
    unique,
)
from mmflow.data.sources import DataSource, register_source
from mmflow.errors import DataError
from mmflow.storage.files import make_temp_dir

JPEG_QUALITY = 95
CSV_NAME = "questions.csv"
IMAGES_DIR = "images"


@dataclass(frozen=True)
class Item:
    """One generated question: its scene and its CSV row (GQA column names)."""

    scene: Scene
    row: dict[str, str]


def answer_vocabulary() -> list[str]:
    """Every answer and option word the six shapes families can produce, sorted."""
    return sorted({*COLORS, *SHAPES, *SIZES, *RELATIONS, *YES_NO})


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
    tmp = make_temp_dir(out_dir, f".{final.name}.")  # 0o777 & ~umask, so others can read the cache
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
    root = Path(expand_path(cache_dir, "data.cache_dir")) if cache_dir else default_cache_dir()
    folder = generate_shapes(root, task, n_samples, seed)
    return read_task_csv(folder / CSV_NAME, task, folder / IMAGES_DIR)


@register_source
class ShapesSource(DataSource):
    """`data=shapes`: generated on first use (`data.seed`), cached under `data.cache_dir`."""

    name = "shapes"

    @classmethod
    def load(cls, data: Mapping[str, Any], task: str, n_samples: int) -> list[Sample | Skip]:
        return load_shapes(task, n_samples, seed=data["seed"], cache_dir=data.get("cache_dir"))

    @classmethod
    def validate(cls, data: Mapping[str, Any]) -> None:
        """`data.seed`: an integer >= 0 (which scenes are drawn)."""
        from mmflow.config.checks import check_int

        check_int({"data.seed": data.get("seed")}, "data.seed", 0)

    @classmethod
    def identity(cls, data: Mapping[str, Any]) -> dict[str, Any]:
        """Where shapes are cached is not which shapes: `cache_dir` counts as null (as in every id)."""
        return {**data, "cache_dir": None} if data.get("cache_dir") is not None else dict(data)
