"""`data=table`: your own VQA file (CSV, JSONL or parquet) read with pandas into `Sample`s.

Each row is translated to the GQA loader's row and parsed by the same code (`gqa.parse_row`), so
every validation and skip rule is the GQA loader's. mmflow's column names (rename yours with
`data.columns: {your_name: mmflow_name}`):

- `question_id` (unique), `image` (file relative to `data.image_dir`, which it may not leave unless
  `data.allow_images_outside: true`), `question`, `answer`
- `image_w`, `image_h`: the image size in pixels (checked against the file)
- `objects`: JSON list of `{"name": ..., "box": [x, y, w, h]}` (GQA pixels; `box: null` for an
  object named in the question but absent from the image): one for ChooseAttr/ChooseCat/QueryAttr,
  two for ChooseRel/CompareAttr/LogicalObj
- `true_option`, `false_option`: ChooseAttr, ChooseCat and ChooseRel only
- `task` (optional): the row's task family; rows of other families are left out of the cell. Without
  it, every row belongs to the cell's `task` (one family per file).

A cell's data is what its file contains: `resolve_data` (called when a cell config is resolved) makes
`data.path` and `data.image_dir` absolute and records `data.format` and `data.sha256` (the digest of
the file's bytes, part of the cell id); `load_table` reads the file once and refuses bytes whose
digest is not the recorded one. Images are not hashed.
"""

from __future__ import annotations

import difflib
import hashlib
import io
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from mmflow.config.paths import expand_path
from mmflow.data.gqa import MALFORMED_ROW, NO_VALUE, check_unique_ids, object_prefixes, parse_row
from mmflow.data.sample import CHOOSE_TASKS, TASKS, Sample, Skip
from mmflow.data.sources import DataSource, register_source
from mmflow.errors import DataError

FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".pq": "parquet"}
BASE = ("question_id", "image", "question", "answer", "image_w", "image_h", "objects")
OPTIONS = ("true_option", "false_option")
TASK_COLUMN = "task"


def required(task: str) -> tuple[str, ...]:
    return BASE + (OPTIONS if task in CHOOSE_TASKS else ())


def table_format(path: Path, fmt: str | None = None) -> str:
    """`fmt`, else the format of `path`'s extension; DataError when neither names one."""
    fmt = fmt or FORMATS.get(path.suffix.lower())
    if fmt not in ("csv", "jsonl", "parquet"):
        raise DataError(f"{path}: unknown table format {fmt!r}; use data.format=csv|jsonl|parquet")
    return fmt


def digest(content: bytes) -> str:
    """The sha256 hex digest of a data file's bytes (`data.sha256`)."""
    return hashlib.sha256(content).hexdigest()


def read_frame(path: Path, fmt: str | None = None, content: bytes | None = None) -> pd.DataFrame:
    """The file (or its `content`, already read) as a frame of its raw values (ids stay strings:
    `000123` is not 123)."""
    fmt = table_format(path, fmt)
    source = io.BytesIO(content) if content is not None else path
    if fmt == "csv":
        return pd.read_csv(source, dtype=str, keep_default_na=False)
    if fmt == "jsonl":
        return pd.read_json(source, lines=True, dtype=False)
    return pd.read_parquet(source)


def resolve_data(data: Mapping[str, Any], base: str | Path | None = None) -> dict[str, Any]:
    """`data` as a cell records it. For `data=table`: `path` and `image_dir` absolute (relative ones
    against `base`, default the working directory), `format` from the extension when not set, and
    `sha256`, the digest of the file's bytes. Other sources are returned unchanged (their ids stay).

    Raises `DataError` when a table's `path` is not set or not a file.
    """
    data = dict(data)
    if data.get("name") != "table":
        return data
    base = Path(base) if base is not None else Path.cwd()
    for key in ("path", "image_dir"):
        if not data.get(key):
            raise DataError(f"data.{key} is required for data=table")
        data[key] = str((base / expand_path(data[key], f"data.{key}")).resolve())
    path = Path(data["path"])
    if not path.is_file():
        raise DataError(f"data.path: table file not found: {path}")
    data["format"] = table_format(path, data.get("format"))
    data["sha256"] = digest(path.read_bytes())
    return data


def _text(value: Any) -> str:
    """A cell value as the GQA parser's string ('' for missing)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _objects(value: Any, task: str) -> dict[str, str]:
    """The `objects` list as the GQA loader's `<prefix> name/x/y/w/h` fields."""
    prefixes = object_prefixes(task)
    if isinstance(value, str):
        value = json.loads(value) if value.strip() else []
    objects = list(value) if value is not None else []
    if len(objects) != len(prefixes):
        raise ValueError(f"{task} needs {len(prefixes)} object(s) in 'objects', got {len(objects)}")
    fields = {}
    for prefix, obj in zip(prefixes, objects, strict=True):
        box = obj.get("box")
        fields[f"{prefix} name"] = _text(obj.get("name"))
        coords = [NO_VALUE] * 4 if box is None else [_text(v) for v in box]
        if len(coords) != 4:
            raise ValueError(f"box of {obj.get('name')!r} must be [x, y, w, h], got {box!r}")
        fields.update({f"{prefix} {k}": c for k, c in zip("xywh", coords, strict=True)})
    return fields


def _gqa_row(record: Mapping[str, Any], task: str, where: str) -> dict[str, str] | Skip:
    image = _text(record["image"]).strip()
    row = {
        "question_id": _text(record["question_id"]).strip(),
        "img_id": Path(image).stem if image else "",
        "image_file": image,
        "question": _text(record["question"]),
        "answer": _text(record["answer"]),
        "image_w": _text(record["image_w"]),
        "image_h": _text(record["image_h"]),
    }
    if task in CHOOSE_TASKS:
        row.update(
            {"true option": _text(record["true_option"]), "false option": _text(record["false_option"])}
        )
    try:
        row.update(_objects(record["objects"], task))
    except (ValueError, TypeError, AttributeError) as exc:
        return Skip(row["question_id"] or f"(no id: {where})", MALFORMED_ROW, f"{where}: objects: {exc}")
    return row


def _table_names(item: Sample | Skip) -> Sample | Skip:
    """A skip's detail with the table's column names (`true_option`), not the GQA row's (`true option`)."""
    if not isinstance(item, Skip):
        return item
    detail = item.detail
    for name in OPTIONS:
        detail = detail.replace(repr(name.replace("_", " ")), repr(name))
    return Skip(item.question_id, item.reason, detail)


def read_table(
    path: str | Path,
    task: str,
    image_dir: str | Path,
    columns: Mapping[str, str] | None = None,
    fmt: str | None = None,
    limit: int | None = None,
    check_images: bool = True,
    sha256: str | None = None,
    images_anywhere: bool = False,
) -> list[Sample | Skip]:
    """The rows of `path` for `task` (first `limit`), each a `Sample` or a `Skip`, in file order.

    Raises `DataError` for a missing file or image folder, missing columns, an unknown task, a
    question id used twice (both rows named) or, given `sha256`, a file whose bytes have another
    digest (it changed after the cell was resolved: its rows must not join that cell).
    """
    path, image_dir = Path(expand_path(path, "data.path")), Path(expand_path(image_dir, "data.image_dir"))
    if task not in TASKS:
        raise DataError(f"unknown task {task!r}; valid tasks: {', '.join(TASKS)}")
    if not path.is_file():
        raise DataError(f"data.path: table file not found: {path}")
    if not image_dir.is_dir():
        raise DataError(f"data.image_dir: table image folder not found: {image_dir}")
    content = path.read_bytes()
    if sha256 is not None and digest(content) != sha256:
        raise DataError(
            f"data.path: {path} changed since this cell was resolved (sha256 {digest(content)[:12]}…, "
            f"the cell's is {sha256[:12]}…); run it again to compute a cell of the new contents"
        )
    frame = read_frame(path, fmt, content).rename(columns=dict(columns or {}))
    missing = [c for c in required(task) if c not in frame.columns]
    if missing:
        raise DataError(
            f"{path}: missing column(s) for task {task}: {', '.join(missing)} (have: "
            f"{', '.join(map(str, frame.columns))}; rename yours with data.columns)"
        )
    frame["_row"] = range(1, len(frame) + 1)
    unknown = None
    if TASK_COLUMN in frame.columns:
        tasks = frame[TASK_COLUMN].fillna("").astype(str).str.strip()
        unknown = tasks.where(~tasks.isin(TASKS))  # the task a row names when it is none of the six
        frame = frame[(tasks == task) | unknown.map(lambda named: _belongs(named, task))]
    if limit is not None:
        frame = frame.head(limit)
    out: list[Sample | Skip] = []
    wheres: list[str] = []
    for index, record in zip(frame.index, frame.to_dict("records"), strict=True):
        where = f"{path.name} data row {record['_row']}"
        named = None if unknown is None else unknown.get(index)
        if isinstance(named, str):  # a row of no known task: recorded, never dropped
            out.append(
                Skip(str(record.get("question_id", record["_row"])), "unknown_task", _why(named, where))
            )
            wheres.append(where)
            continue
        row = _gqa_row(record, task, where)
        out.append(
            row
            if isinstance(row, Skip)
            else _table_names(parse_row(row, task, image_dir, where, check_images, images_anywhere))
        )
        wheres.append(where)
    check_unique_ids(out, wheres)
    return out


def _closest_task(named: str) -> str | None:
    close = difflib.get_close_matches(named, TASKS, n=1, cutoff=0.5)
    return close[0] if close else None


def _belongs(named: object, task: str) -> bool:
    """A row whose task is none of the six is recorded in the cell of the task it most resembles
    (`ChoseAttr` → ChooseAttr), or in every task's cell when it resembles none (an empty task)."""
    if not isinstance(named, str):
        return False
    closest = _closest_task(named)
    return closest is None or closest == task


def _why(named: str, where: str) -> str:
    closest = _closest_task(named)
    hint = f"; did you mean {closest}?" if closest else f"; tasks: {', '.join(TASKS)}"
    return f"{where}: task {named!r} is none of the six{hint}"


def load_table(data: Mapping[str, Any], task: str, n_samples: int | None = None) -> list[Sample | Skip]:
    """`data=table`: `data.path`, `data.image_dir`, optional `data.columns` and `data.format`; the
    file must still have the digest `data.sha256` when the config records one (`resolve_data`)."""
    for key in ("path", "image_dir"):
        if not data.get(key):
            raise DataError(f"data.{key} is required for data=table")
    return read_table(
        data["path"],
        task,
        data["image_dir"],
        data.get("columns"),
        data.get("format"),
        limit=n_samples,
        sha256=data.get("sha256"),
        images_anywhere=bool(data.get("allow_images_outside", False)),
    )


@register_source
class TableSource(DataSource):
    """`data=table`: your own CSV, JSONL or parquet file, identified by its bytes (`data.sha256`)."""

    name = "table"

    @classmethod
    def load(cls, data: Mapping[str, Any], task: str, n_samples: int) -> list[Sample | Skip]:
        return load_table(data, task, n_samples=n_samples)

    @classmethod
    def resolve(cls, data: Mapping[str, Any], base: str | Path | None = None) -> dict[str, Any]:
        """`resolve_data`, once: a config that records its digest is already resolved (its id stays;
        `load_table` checks the file still has that digest)."""
        return dict(data) if data.get("sha256") else resolve_data(data, base)

    @classmethod
    def identity(cls, data: Mapping[str, Any]) -> dict[str, Any]:
        """The bytes, not where they lie: `path` is left out once `sha256` is known."""
        return {k: v for k, v in data.items() if k != "path"} if data.get("sha256") else dict(data)

    @classmethod
    def check_identifiable(cls, data: Mapping[str, Any]) -> None:
        if not data.get("sha256"):
            raise ValueError(
                "data=table config without data.sha256 (the digest of its file): resolve it with "
                "mmflow.data.resolve_data before computing its cell id"
            )
