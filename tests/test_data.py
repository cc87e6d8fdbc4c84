"""Tests of the data layer: GQA CSV parsing, skip reasons, and the synthetic shapes set."""

from __future__ import annotations

import csv
import re
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from mmflow.data import (
    CHOOSE_TASKS,
    TASKS,
    Box,
    DataError,
    Sample,
    Skip,
    load_gqa,
    load_shapes,
    scenes,
    shapes,
)
from mmflow.data.gqa import GQA_TASKS_DIR, read_task_csv, required_columns

REAL_ROWS = {
    "ChooseAttr": 1000,
    "ChooseCat": 1000,
    "ChooseRel": 964,
    "CompareAttr": 570,
    "LogicalObj": 991,
    "QueryAttr": 1000,
}
# The only real rows whose boxes are out of the image by more than the tolerance (34-167 px).
REAL_OUTSIDE = {"ChooseCat": {"1595102"}, "CompareAttr": {"11571132"}, "QueryAttr": {"1594913"}}


def parse_real(task: str) -> list[Sample | Skip]:
    return read_task_csv(GQA_TASKS_DIR / f"{task}.csv", task, Path("/nonexistent"), check_images=False)


def csv_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def write_csv(path: Path, header: list[str], rows: list[dict[str, str]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=header, restval="")
        writer.writeheader()
        writer.writerows(rows)
    return path


def jpeg(path: Path, size: tuple[int, int]) -> Path:
    Image.new("RGB", size, (200, 100, 50)).save(path, format="JPEG", quality=90)
    return path


# ---------------------------------------------------------------- real GQA files


@pytest.mark.parametrize("task", TASKS)
def test_real_files_one_result_per_row(task: str) -> None:
    results = parse_real(task)
    assert len(results) == REAL_ROWS[task] == len(csv_rows(GQA_TASKS_DIR / f"{task}.csv"))
    assert not [r for r in results if isinstance(r, Skip)]  # a bad box is not a bad sample
    bad_boxes = [r for r in results if r.box_issue is not None]
    assert {s.question_id for s in bad_boxes} == REAL_OUTSIDE.get(task, set())
    assert all(s.box_issue[0] == "box_outside_image" and s.object_boxes == () for s in bad_boxes)
    for s in (r for r in results if r.box_issue is None):
        assert s.task == task and s.answer and s.question.strip()
        assert 1 <= len(s.object_boxes) == len(s.object_names) <= 2
        assert all(b.inside(*s.image_size) for b in s.object_boxes)  # 1-2 px overflows are clipped
        assert (s.true_option is not None) == (task in CHOOSE_TASKS)
        if task in CHOOSE_TASKS:
            assert s.answer == s.true_option != s.false_option


def test_real_leading_zero_ids_and_fields() -> None:
    query = parse_real("QueryAttr")
    first = query[0]
    assert isinstance(first, Sample)
    assert first.question_id == "02452198"
    assert first.question == "On which side of the photo is the curtain?"
    assert first.answer == "right"
    assert first.image_size == (500, 333)
    assert first.object_names == ("curtain",)
    assert first.object_boxes == (Box(337, 23, 162, 310),)
    assert first.image_path == Path("/nonexistent/2386586.jpg")
    assert first.extra["type_detailed"] == "positionQuery"
    assert sum(r.question_id.startswith("0") for r in query) == 506

    attr = parse_real("ChooseAttr")[0]
    assert (attr.question_id, attr.answer, attr.true_option, attr.false_option) == (
        "171031170",
        "empty",
        "empty",
        "full",
    )
    assert attr.object_boxes == (Box(253, 291, 60, 105),) and attr.image_size == (375, 500)


def test_real_two_object_rows() -> None:
    rel = parse_real("ChooseRel")[0]
    assert rel.object_names == ("surfboard", "surfer")
    assert rel.object_boxes == (Box(258, 157, 43, 22), Box(290, 77, 74, 110))
    logical = parse_real("LogicalObj")[0]  # object2 fields are '-': one box, the name kept aside
    assert logical.object_names == ("grass",) and len(logical.object_boxes) == 1
    assert logical.extra["absent_objects"] == ("mud",)
    assert logical.answer == "no"


# ---------------------------------------------------------------- fabricated GQA files

QUERY_HEADER = list(required_columns("QueryAttr")) + ["type_detailed"]


def query_row(qid: str = "0007", img: str = "0042", **over: str) -> dict[str, str]:
    row = {
        "question_id": qid,
        "img_id": img,
        "question": "What color is the cat?",
        "answer": "black",
        "image_w": "64",
        "image_h": "48",
        "central object name": "cat",
        "central object x": "10",
        "central object y": "5",
        "central object w": "20",
        "central object h": "30",
        "type_detailed": "colorQuery",
    }
    row.update(over)
    return row


def read_one(tmp_path: Path, row: dict[str, str], check_images: bool = False) -> Sample | Skip:
    path = write_csv(tmp_path / "q.csv", QUERY_HEADER, [query_row(qid="0001"), row])
    results = read_task_csv(path, "QueryAttr", tmp_path, check_images=check_images)
    assert len(results) == 2
    return results[1]


def test_missing_columns_raise(tmp_path: Path) -> None:
    header = [c for c in QUERY_HEADER if c not in ("answer", "central object w")]
    path = write_csv(tmp_path / "bad.csv", header, [])
    with pytest.raises(DataError, match=r"bad\.csv.*answer, central object w"):
        read_task_csv(path, "QueryAttr", tmp_path)
    # ChooseAttr needs options and the central object: QueryAttr's header lacks the options
    with pytest.raises(DataError, match="true option, false option"):
        read_task_csv(write_csv(tmp_path / "c.csv", QUERY_HEADER, []), "ChooseAttr", tmp_path)


def test_unknown_task_and_missing_inputs(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="ChooseAttr, ChooseCat"):
        load_gqa("CountObj", tmp_path)
    with pytest.raises(DataError, match=r"images\.zip.*data\.image_dir"):
        load_gqa("QueryAttr", tmp_path / "nope")
    with pytest.raises(DataError, match="not found"):
        read_task_csv(tmp_path / "none.csv", "QueryAttr", tmp_path)


def test_malformed_number_names_row_and_column(tmp_path: Path) -> None:
    skip = read_one(tmp_path, query_row(qid="0099", **{"central object x": "12px"}))
    assert skip == Skip("0099", "malformed_row", skip.detail)
    assert "q.csv data row 2 (line 3)" in skip.detail and "'central object x'" in skip.detail
    skip = read_one(tmp_path, query_row(image_w="64.5"))
    assert skip.reason == "malformed_row" and "'image_w'" in skip.detail


def test_empty_text_is_malformed(tmp_path: Path) -> None:
    assert read_one(tmp_path, query_row(question="  ")).reason == "malformed_row"
    skip = read_one(tmp_path, query_row(answer=""))
    assert skip.reason == "malformed_row" and "'answer'" in skip.detail


def test_box_checks(tmp_path: Path) -> None:
    outside = read_one(tmp_path, query_row(**{"central object w": "60"}))  # 10 + 60 > 64 + 2
    assert isinstance(outside, Sample) and outside.object_boxes == ()  # still a sample: only the
    assert outside.box_issue[0] == "box_outside_image"  # object-patch groups skip it
    clipped = read_one(tmp_path, query_row(**{"central object w": "56"}))  # 2 px over: clipped
    assert isinstance(clipped, Sample) and clipped.object_boxes == (Box(10, 5, 54, 30),)
    assert clipped.box_issue is None
    dashes = {f"central object {k}": "-" for k in "xywh"}
    assert read_one(tmp_path, query_row(**dashes)).box_issue[0] == "missing_box"
    assert read_one(tmp_path, query_row(**{"central object h": "-"})).reason == "malformed_row"


def test_image_checks(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    jpeg(images / "0001.jpg", (64, 48))
    jpeg(images / "0003.jpg", (48, 64))
    (images / "0004.jpg").write_bytes(b"not a jpeg at all")
    good = (images / "0001.jpg").read_bytes()
    (images / "0005.jpg").write_bytes(good[: len(good) // 2])
    rows = [query_row(qid=f"00{i}", img=f"000{i}") for i in range(1, 6)]
    path = write_csv(tmp_path / "q.csv", QUERY_HEADER, rows)
    results = read_task_csv(path, "QueryAttr", images)
    assert [r.question_id for r in results] == ["001", "002", "003", "004", "005"]
    assert isinstance(results[0], Sample) and results[0].image_path == (images / "0001.jpg").absolute()
    assert [getattr(r, "reason", None) for r in results] == [
        None,
        "missing_image",
        "image_size_mismatch",
        "unreadable_image",
        "unreadable_image",
    ]
    assert all(len(r.detail) > 0 for r in results[1:])


def test_load_gqa_first_n_rows_in_order(tmp_path: Path) -> None:
    rows = csv_rows(GQA_TASKS_DIR / "QueryAttr.csv")[:5]
    for row in rows[:4]:
        jpeg(tmp_path / f"{row['img_id']}.jpg", (int(row["image_w"]), int(row["image_h"])))
    results = load_gqa("QueryAttr", tmp_path, n_samples=5)
    assert [r.question_id for r in results] == [row["question_id"] for row in rows]
    assert [type(r) for r in results] == [Sample] * 4 + [Skip]
    assert results[4].reason == "missing_image"
    assert load_gqa("QueryAttr", tmp_path, n_samples=0) == []


# ---------------------------------------------------------------- synthetic shapes


def the(objects: tuple[scenes.Obj, ...], **attrs: str) -> scenes.Obj:
    """The single object with these attributes (fails if the referent is ambiguous or absent)."""
    found = [o for o in objects if all(getattr(o, k) == v for k, v in attrs.items())]
    assert len(found) == 1, (attrs, objects)
    return found[0]


def derive(task: str, question: str, objects: tuple[scenes.Obj, ...]) -> tuple[str, list]:
    """Answer a question from the scene spec alone; also return the referent objects."""
    if task == "ChooseAttr":
        shape, a, b = re.fullmatch(r"Is the (\w+) (\w+) or (\w+)\?", question).groups()
        o = the(objects, shape=shape)
        value = o.color if a in shapes.COLORS else o.size
        assert [a, b].count(value) == 1
        return value, [o]
    if task == "ChooseCat":
        color, a, b = re.fullmatch(r"Is the (\w+) object an? (\w+) or an? (\w+)\?", question).groups()
        o = the(objects, color=color)
        assert [a, b].count(o.shape) == 1
        return o.shape, [o]
    if task == "ChooseRel":
        m = re.fullmatch(r"Is the (\w+) to the (left|right) or to the (left|right) of the (\w+)\?", question)
        a, b = the(objects, shape=m[1]), the(objects, shape=m[4])
        assert {m[2], m[3]} == {"left", "right"}
        if a.box[0] + a.box[2] <= b.box[0]:
            return "left", [a, b]
        assert b.box[0] + b.box[2] <= a.box[0], "left/right would be ambiguous"
        return "right", [a, b]
    if task == "CompareAttr":
        s1, s2, attr = re.fullmatch(
            r"Do the (\w+) and the (\w+) have the same (color|size)\?", question
        ).groups()
        a, b = the(objects, shape=s1), the(objects, shape=s2)
        return ("yes" if getattr(a, attr) == getattr(b, attr) else "no"), [a, b]
    if task == "LogicalObj":
        c1, s1, c2, s2 = re.fullmatch(r"Is there an? (\w+) (\w+) or an? (\w+) (\w+)\?", question).groups()
        hit = any((o.color, o.shape) in ((c1, s1), (c2, s2)) for o in objects)
        second = [o for o in objects if o.shape == s2]
        return ("yes" if hit else "no"), [the(objects, shape=s1), second[0] if second else None]
    (shape,) = re.fullmatch(r"What color is the (\w+)\?", question).groups()
    o = the(objects, shape=shape)
    return o.color, [o]


def row_boxes(task: str, row: dict[str, str]) -> list:
    prefixes = ["central object"] if "central object x" in row else ["object1", "object2"]
    boxes = []
    for p in prefixes:
        values = [row[f"{p} {k}"] for k in "xywh"]
        boxes.append(None if values == ["-"] * 4 else tuple(int(v) for v in values))
    return boxes


@pytest.mark.parametrize("task", TASKS)
def test_shapes_answers_correct_by_construction(task: str) -> None:
    vocab = set(shapes.answer_vocabulary())
    answers = Counter()
    for seed in range(4):
        for item in shapes.make_items(task, 60, seed):
            row, scene = item.row, item.scene
            answer, referents = derive(task, row["question"], scene.objects)
            assert row["answer"] == answer
            answers[answer] += 1
            assert row_boxes(task, row) == [o.box if o else None for o in referents]
            for o in scene.objects:
                assert Box(*o.box).inside(scene.width, scene.height)
            if task in CHOOSE_TASKS:
                assert row["true option"] == answer != row["false option"]
                for word in (row["true option"], row["false option"]):
                    assert re.search(rf"\b{word}\b", row["question"])
                    assert word in vocab
            assert answer in vocab and answer == answer.lower() and " " not in answer
    if task in ("CompareAttr", "LogicalObj"):
        assert 0.4 < answers["yes"] / 240 < 0.6
    assert len(answers) >= 2


def test_shapes_scene_variety_and_rendering() -> None:
    items = shapes.make_items("QueryAttr", 60, 0)
    assert len({(i.scene.width, i.scene.height) for i in items}) >= 4
    assert {len(i.scene.objects) for i in items} == {2, 3, 4}
    for item in items[:10]:
        scene = item.scene
        image = shapes.draw(scene)
        for o in scene.objects:
            x, y, w, h = o.box
            assert image.getpixel((x + w // 2, y + h // 2)) == scenes.RGB[o.color]
            for px in [
                (x - 2, y + h // 2),
                (x + w + 1, y + h // 2),
                (x + w // 2, y - 2),
                (x + w // 2, y + h + 1),
            ]:
                inside_other = any(
                    b.box[0] <= px[0] < b.box[0] + b.box[2] and b.box[1] <= px[1] < b.box[1] + b.box[3]
                    for b in scene.objects
                )
                if 0 <= px[0] < scene.width and 0 <= px[1] < scene.height and not inside_other:
                    assert image.getpixel(px) == scene.background


def test_generate_shapes_deterministic_and_cached(tmp_path: Path) -> None:
    a = shapes.generate_shapes(tmp_path / "a", "ChooseRel", 6, seed=3)
    b = shapes.generate_shapes(tmp_path / "b", "ChooseRel", 6, seed=3)
    c = shapes.generate_shapes(tmp_path / "c", "ChooseRel", 6, seed=4)
    assert a.name == "ChooseRel_seed3_n6"
    assert (a / "questions.csv").read_bytes() == (b / "questions.csv").read_bytes()
    assert (a / "questions.csv").read_bytes() != (c / "questions.csv").read_bytes()
    names = sorted(p.name for p in (a / "images").iterdir())
    assert names == [f"00000{i}.jpg" for i in range(6)]
    for name in names:
        data = (a / "images" / name).read_bytes()
        assert data[:3] == b"\xff\xd8\xff"  # real JPEG
        assert data == (b / "images" / name).read_bytes()
        assert data != (c / "images" / name).read_bytes()
    mtime = (a / "questions.csv").stat().st_mtime_ns
    assert shapes.generate_shapes(tmp_path / "a", "ChooseRel", 6, seed=3) == a
    assert (a / "questions.csv").stat().st_mtime_ns == mtime
    assert [p.name for p in (tmp_path / "a").iterdir()] == [a.name]  # no temp folders left
    with open(GQA_TASKS_DIR / "ChooseRel.csv", newline="") as f:
        assert (a / "questions.csv").read_text().splitlines()[0] == ",".join(next(csv.reader(f)))
    first = shapes.make_items("ChooseRel", 3, 3)
    written = csv_rows(a / "questions.csv")[:3]  # n only extends the set; other GQA columns are empty
    assert [i.row for i in first] == [{k: r[k] for k in i.row} for i, r in zip(first, written, strict=True)]


@pytest.mark.parametrize("task", TASKS)
def test_load_shapes_all_families(task: str, tmp_path: Path) -> None:
    samples = load_shapes(task, 5, seed=1, cache_dir=tmp_path)
    assert len(samples) == 5 and all(isinstance(s, Sample) for s in samples)
    assert samples[0].question_id == "000000"
    for s in samples:
        assert s.task == task and s.image_path.is_file() and s.image_path.is_absolute()
        assert s.answer in shapes.answer_vocabulary()
        assert s.object_boxes and all(b.inside(*s.image_size) for b in s.object_boxes)
        with Image.open(s.image_path) as im:
            assert im.format == "JPEG" and im.size == s.image_size
        assert (s.true_option is not None) == (task in CHOOSE_TASKS)


def test_load_shapes_env_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MMFLOW_CACHE", str(tmp_path))
    samples = load_shapes("QueryAttr", 2, seed=7)
    assert samples[0].image_path.is_relative_to(tmp_path / "shapes" / "QueryAttr_seed7_n2")


def test_answer_vocabulary() -> None:
    vocab = shapes.answer_vocabulary()
    assert vocab == sorted(set(vocab))
    assert {"yes", "no", "left", "right", "small", "large", *shapes.COLORS, *shapes.SHAPES} == set(vocab)


def test_wrong_field_count_is_malformed(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "q.csv", QUERY_HEADER, [query_row()])
    with path.open("a", encoding="utf-8") as f:
        f.write("0123,0042,What?,red,64\n")
    results = read_task_csv(path, "QueryAttr", tmp_path, check_images=False)
    assert isinstance(results[0], Sample)
    assert results[1] == Skip("0123", "malformed_row", results[1].detail)
    assert "data row 2" in results[1].detail
