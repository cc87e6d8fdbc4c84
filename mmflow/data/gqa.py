"""Read the GQA task CSVs (and the synthetic shapes CSVs, same schema) into `Sample`s.

Every row becomes either a `Sample` or a `Skip` with a machine-readable reason, so a run can
report what it left out instead of crashing on one bad row or silently dropping it. Whole-file
problems (missing file, missing columns, unknown task, no image folder, two rows with one
question id) raise `DataError`. `mmflow.data.table` reads users' own files through the same rules.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from PIL import Image

from mmflow.config.paths import expand_path, inside
from mmflow.data.sample import CHOOSE_TASKS, TASKS, Box, Sample, Skip
from mmflow.data.sources import DataSource, register_source
from mmflow.errors import DataError

GQA_TASKS_DIR = Path(__file__).parent / "gqa_tasks"

# GQA boxes come from rounded Visual Genome annotations; real rows overflow the image by 1-2 px
# (74 boxes over the six files), while the few genuinely broken ones overflow by 34-167 px.
BOX_TOLERANCE_PX = 2

# Skip reasons (the `Skip.reason` values this module produces).
MALFORMED_ROW = "malformed_row"
MISSING_BOX = "missing_box"
BOX_OUTSIDE_IMAGE = "box_outside_image"
MISSING_IMAGE = "missing_image"
IMAGE_OUTSIDE_IMAGE_DIR = "image_outside_image_dir"
UNREADABLE_IMAGE = "unreadable_image"
IMAGE_SIZE_MISMATCH = "image_size_mismatch"
SKIP_REASONS: tuple[str, ...] = (
    MALFORMED_ROW,
    MISSING_BOX,
    BOX_OUTSIDE_IMAGE,
    MISSING_IMAGE,
    IMAGE_OUTSIDE_IMAGE_DIR,
    UNREADABLE_IMAGE,
    IMAGE_SIZE_MISMATCH,
)

NO_VALUE = "-"
BASE_COLUMNS = ("question_id", "img_id", "question", "answer", "image_w", "image_h")
OPTION_COLUMNS = ("true option", "false option")
CENTRAL_TASKS = frozenset({"ChooseAttr", "ChooseCat", "QueryAttr"})
PAIR_TASKS = frozenset({"ChooseRel", "CompareAttr", "LogicalObj"})


class _RowError(Exception):
    """Internal: one row cannot be used; carries the skip reason and detail."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def object_prefixes(task: str) -> tuple[str, ...]:
    """Column-name prefixes of the task's object boxes, in `Sample.object_boxes` order."""
    if task in CENTRAL_TASKS:
        return ("central object",)
    if task in PAIR_TASKS:
        return ("object1", "object2")
    raise DataError(f"unknown task {task!r}; valid tasks: {', '.join(TASKS)}")


def required_columns(task: str) -> tuple[str, ...]:
    """Columns a task CSV must have for `read_task_csv` to build samples."""
    cols = list(BASE_COLUMNS)
    if task in CHOOSE_TASKS:
        cols += OPTION_COLUMNS
    for prefix in object_prefixes(task):
        cols += [f"{prefix} name"] + [f"{prefix} {k}" for k in "xywh"]
    return tuple(cols)


def _check_header(csv_path: Path, header: list[str] | None, task: str) -> None:
    if not header:
        raise DataError(f"{csv_path}: empty file, expected a CSV header for task {task}")
    missing = [c for c in required_columns(task) if c not in header]
    if missing:
        raise DataError(f"{csv_path}: missing required column(s) for task {task}: {', '.join(missing)}")


def _number(row: dict[str, str], col: str, where: str) -> float:
    raw = row[col]
    try:
        value = float(raw)
    except ValueError:
        raise _RowError(MALFORMED_ROW, f"{where}: column {col!r}: not a number: {raw!r}") from None
    if not math.isfinite(value):
        raise _RowError(MALFORMED_ROW, f"{where}: column {col!r}: not a finite number: {raw!r}")
    return value


def _image_dim(row: dict[str, str], col: str, where: str) -> int:
    value = _number(row, col, where)
    if value <= 0 or value != int(value):
        raise _RowError(MALFORMED_ROW, f"{where}: column {col!r}: not a positive integer: {row[col]!r}")
    return int(value)


def _text(row: dict[str, str], col: str, where: str) -> str:
    value = row[col]
    if not value.strip():
        raise _RowError(MALFORMED_ROW, f"{where}: column {col!r} is empty")
    return value


def _object(row: dict[str, str], prefix: str, where: str) -> tuple[str, Box | None]:
    """(name, box) of one object; box is None when all four box fields are '-'."""
    name = row[f"{prefix} name"].strip()
    cols = [f"{prefix} {k}" for k in "xywh"]
    dashes = [row[c].strip() == NO_VALUE for c in cols]
    if all(dashes):
        return name, None
    if any(dashes):
        raise _RowError(MALFORMED_ROW, f"{where}: {prefix} box is partly '-': {[row[c] for c in cols]}")
    if not name or name == NO_VALUE:
        raise _RowError(MALFORMED_ROW, f"{where}: column {prefix + ' name'!r} is empty but a box is given")
    x, y, w, h = (_number(row, c, where) for c in cols)
    return name, Box(x, y, w, h)


def _fit_box(box: Box, width: int, height: int, prefix: str, where: str) -> Box:
    """Clip a box that overflows any edge of the image by at most BOX_TOLERANCE_PX; reject worse ones.

    The same tolerance holds on all four edges (x or y of -1 or -2, or a box ending a pixel or two past
    the right or bottom edge); the kept box is the part inside the image.
    """
    tol = BOX_TOLERANCE_PX
    overflow = max(-box.x, -box.y, box.x + box.w - width, box.y + box.h - height)
    if box.w <= 0 or box.h <= 0 or overflow > tol + 1e-6:
        raise _RowError(
            BOX_OUTSIDE_IMAGE,
            f"{where}: {prefix} box {box} is outside the {width}x{height} image (tolerance {tol} px)",
        )
    x0, y0 = max(box.x, 0.0), max(box.y, 0.0)
    x1, y1 = min(box.x + box.w, float(width)), min(box.y + box.h, float(height))
    clipped = Box(x0, y0, x1 - x0, y1 - y0)
    if not clipped.inside(width, height):
        raise _RowError(BOX_OUTSIDE_IMAGE, f"{where}: {prefix} box {box} is empty inside the image")
    return clipped


def _check_image(path: Path, size: tuple[int, int], where: str) -> None:
    """Fail unless the JPEG exists, decodes (cheaply, at reduced scale) and has the CSV's size."""
    if not path.is_file():
        raise _RowError(MISSING_IMAGE, f"{where}: image not found: {path}")
    try:
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:
            actual = im.size
            im.draft("RGB", (max(1, actual[0] // 8), max(1, actual[1] // 8)))
            im.load()  # catches truncated files, which verify() does not for JPEG
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad files
        raise _RowError(UNREADABLE_IMAGE, f"{where}: cannot read image {path}: {exc}") from None
    if actual != size:
        raise _RowError(
            IMAGE_SIZE_MISMATCH,
            f"{where}: image {path} is {actual[0]}x{actual[1]}, the CSV says {size[0]}x{size[1]}",
        )


def _image_path(row: dict[str, str], img_id: str, image_dir: Path, where: str, anywhere: bool) -> Path:
    """The row's image file: `image_file` (or `<img_id>.jpg`) relative to `image_dir`, which it may not
    leave (`..`, an absolute path) unless `data.allow_images_outside` is true."""
    written = row.get("image_file") or f"{img_id}.jpg"
    path = (image_dir / written).absolute()
    if not anywhere and not inside(path, image_dir.absolute()):
        raise _RowError(
            IMAGE_OUTSIDE_IMAGE_DIR,
            f"{where}: image {written!r} is outside data.image_dir {str(image_dir)!r} "
            "(add +data.allow_images_outside=true to allow it)",
        )
    return path


def _row_to_sample(
    row: dict[str, str], task: str, image_dir: Path, where: str, check_images: bool, anywhere: bool = False
) -> Sample:
    qid = row["question_id"].strip()
    img_id = _text(row, "img_id", where).strip()
    question = _text(row, "question", where)
    answer = _text(row, "answer", where)
    size = (_image_dim(row, "image_w", where), _image_dim(row, "image_h", where))
    true_opt = _text(row, "true option", where) if task in CHOOSE_TASKS else None
    false_opt = _text(row, "false option", where) if task in CHOOSE_TASKS else None
    objects = [(prefix, *_object(row, prefix, where)) for prefix in object_prefixes(task)]
    present = [(prefix, name, box) for prefix, name, box in objects if box is not None]
    boxes, box_issue = _usable_boxes(present, size, where)
    image_path = _image_path(row, img_id, image_dir, where, anywhere)
    if check_images:
        _check_image(image_path, size, where)
    extra: dict = {"img_id": img_id}
    if row.get("type_detailed"):
        extra["type_detailed"] = row["type_detailed"]
    absent = tuple(name for _, name, box in objects if box is None and name and name != NO_VALUE)
    if absent:
        extra["absent_objects"] = absent  # named in the question, not in the image (LogicalObj)
    return Sample(
        question_id=qid,
        task=task,
        image_path=image_path,
        question=question,
        answer=answer,
        image_size=size,
        object_names=tuple(name for _, name, _ in present),
        object_boxes=boxes,
        true_option=true_opt,
        false_option=false_opt,
        extra=extra,
        box_issue=box_issue,
    )


def _usable_boxes(present: list, size: tuple[int, int], where: str) -> tuple[tuple[Box, ...], tuple | None]:
    """The fitted boxes, or no boxes and the (reason, detail) that makes them unusable.

    A bad box is not a bad sample: only the groups built from object patches need it.
    """
    try:
        if not present:
            raise _RowError(MISSING_BOX, f"{where}: no object box (all box fields are '-')")
        return tuple(_fit_box(box, *size, prefix, where) for prefix, _, box in present), None
    except _RowError as err:
        return (), (err.reason, err.detail)


def read_task_csv(
    csv_path: Path,
    task: str,
    image_dir: Path,
    check_images: bool = True,
    limit: int | None = None,
) -> list[Sample | Skip]:
    """Parse one task CSV: one `Sample` or `Skip` per data row, in file order.

    `limit` keeps only the first `limit` data rows (so images beyond them are not touched);
    `check_images=False` skips the image checks (existence, decoding, size) for offline parsing.
    Skip details name the file, the 1-based data row (header excluded) and the file line.
    """
    csv_path = Path(csv_path)
    image_dir = Path(image_dir)
    if task not in TASKS:
        raise DataError(f"unknown task {task!r}; valid tasks: {', '.join(TASKS)}")
    if not csv_path.is_file():
        raise DataError(f"task file not found: {csv_path}")
    out: list[Sample | Skip] = []
    wheres: list[str] = []
    with csv_path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        _check_header(csv_path, reader.fieldnames, task)
        start_line = reader.line_num + 1
        for index, row in enumerate(reader, start=1):
            if limit is not None and index > limit:
                break
            where = f"{csv_path.name} data row {index} (line {start_line})"
            start_line = reader.line_num + 1
            out.append(parse_row(row, task, image_dir, where, check_images))
            wheres.append(where)
    check_unique_ids(out, wheres)
    return out


def check_unique_ids(rows: list[Sample | Skip], wheres: list[str]) -> None:
    """Raise `DataError` naming both rows when two rows share a question id (counts never shrink)."""
    first: dict[str, str] = {}
    for row, where in zip(rows, wheres, strict=True):
        if row.question_id in first:
            raise DataError(
                f"duplicate question_id {row.question_id!r}: {first[row.question_id]} and {where} "
                "(question ids identify samples and their result files; make them unique)"
            )
        first[row.question_id] = where


def parse_row(
    row: dict, task: str, image_dir: Path, where: str, check_images: bool, images_anywhere: bool = False
) -> Sample | Skip:
    """One row (GQA column names, string values) -> `Sample`, or `Skip` with reason and detail.

    An optional `image_file` entry names the image relative to `image_dir` (default `<img_id>.jpg`);
    one outside `image_dir` is an `image_outside_image_dir` skip unless `images_anywhere`.
    A row without a question id is skipped under the id `(no id: <where>)`, so no two rows share one.
    """
    qid = (row.get("question_id") or "").strip()
    if None in row or any(v is None for v in row.values()):
        return Skip(qid or f"(no id: {where})", MALFORMED_ROW, f"{where}: wrong number of fields")
    if not qid:
        return Skip(f"(no id: {where})", MALFORMED_ROW, f"{where}: column 'question_id' is empty")
    try:
        return _row_to_sample(row, task, image_dir, where, check_images, images_anywhere)
    except _RowError as err:
        return Skip(qid, err.reason, err.detail)


def load_gqa(
    task: str,
    image_dir: str | Path | None,
    n_samples: int | None = None,
    tasks_dir: Path | None = None,
) -> list[Sample | Skip]:
    """The first `n_samples` rows (all when None) of a GQA task file, as Samples or Skips.

    Skips count toward `n_samples`: the result always covers exactly the first n rows of the file.
    """
    if task not in TASKS:
        raise DataError(f"unknown task {task!r}; valid tasks: {', '.join(TASKS)}")
    if n_samples is not None and n_samples < 0:
        raise DataError(f"n_samples must be >= 0 or None, got {n_samples}")
    image_dir = Path(expand_path(image_dir, "data.image_dir")) if image_dir else None
    if image_dir is None or not image_dir.is_dir():
        raise DataError(
            f"GQA image folder not found: {image_dir}. Download GQA's images.zip "
            "(https://downloads.cs.stanford.edu/nlp/data/gqa/images.zip), unzip it and set "
            "data.image_dir to the folder holding <img_id>.jpg files."
        )
    csv_path = Path(tasks_dir or GQA_TASKS_DIR) / f"{task}.csv"
    return read_task_csv(csv_path, task, image_dir, limit=n_samples)


@register_source
class GqaSource(DataSource):
    """`data=gqa`: the paper's task files (packaged), images from `data.image_dir`."""

    name = "gqa"

    @classmethod
    def load(cls, data: Mapping[str, Any], task: str, n_samples: int) -> list[Sample | Skip]:
        return load_gqa(task, data["image_dir"], n_samples=n_samples)
