"""How many GQA rows' token groups change between parity=paper and parity=corrected, per model and task.

Groups depend only on the prompt, the image size and the boxes, so each row is encoded with a blank
image of its recorded size on the model's CPU replica. One JSON line per (model, task):
rows, rows whose groups differ at all, whose object-patch set (relative to the image start)
differs, and whose image-token count differs.

    python scripts/parity_rows.py [--limit N] [--models llava-1.5-7b,...] > parity_rows.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from PIL import Image

import mmflow.inputs.object_patches as patches_module
from mmflow.data.gqa import GQA_TASKS_DIR, read_task_csv
from mmflow.data.sample import TASKS, Sample
from mmflow.errors import GroupError
from mmflow.inputs.encode import encode
from mmflow.inputs.groups import build_token_groups

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from replica_helpers import REAL_MODELS, loaded_replica  # noqa: E402

_OVERLAP = patches_module.box_pixels
_OVERLAP_CACHE: dict = {}


def _cached_overlap(loaded, size, boxes):
    """box_pixels, shared by models with the same image geometry and parity."""
    key = (loaded.image_preprocess, loaded.parity, tuple(size), boxes)
    if key not in _OVERLAP_CACHE:
        _OVERLAP_CACHE[key] = _OVERLAP(loaded, size, boxes)
    return _OVERLAP_CACHE[key]


class _CachedProcessor:
    """The processor, with the image-only call (`text="<image>"`, blank image) cached per image size."""

    def __init__(self, processor):
        self._processor, self._cache = processor, {}

    def __getattr__(self, name):
        return getattr(self._processor, name)

    def __call__(self, text=None, images=None, **kwargs):
        key = (text, images.size, tuple(sorted(kwargs.items())))
        if key not in self._cache:
            self._cache[key] = self._processor(text=text, images=images, **kwargs)
        return self._cache[key]


def groups_of(loaded, sample: Sample) -> dict | str:
    image = Image.new("RGB", sample.image_size)
    try:
        groups = build_token_groups(loaded, encode(loaded, sample, image), sample)
    except GroupError as exc:
        return f"skip:{exc.reason}"
    names = ("image", "question", "last", "true_option", "false_option")
    out = {name: groups.get(name).tolist() for name in names}
    out["object_rel"] = (groups.object - groups.image[0]).tolist() if groups.object.numel() else []
    out["object"] = groups.object.tolist()
    out["nonobject"] = groups.nonobject.tolist()
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--limit", type=int, default=None, help="first N rows per task")
    parser.add_argument("--models", default=",".join(REAL_MODELS))
    args = parser.parse_args()
    patches_module.box_pixels = _cached_overlap
    for name in args.models.split(","):
        loaded = {p: loaded_replica(name, p) for p in ("paper", "corrected")}
        for model in loaded.values():
            model.processor = _CachedProcessor(model.processor)
        for task in TASKS:
            rows = read_task_csv(GQA_TASKS_DIR / f"{task}.csv", task, Path("/nonexistent"), False, args.limit)
            counts = {"model": name, "task": task, "rows": len(rows), "groups_differ": 0}
            counts.update(object_set_differs=0, object_empty_in_one_mode=0, image_tokens_differ=0)
            counts["bad_box_rows"] = 0
            for sample in rows:
                if not isinstance(sample, Sample):
                    continue
                counts["bad_box_rows"] += sample.box_issue is not None
                paper, corrected = (groups_of(loaded[p], sample) for p in ("paper", "corrected"))
                counts["groups_differ"] += paper != corrected
                if isinstance(paper, dict) and isinstance(corrected, dict):
                    counts["object_set_differs"] += paper["object_rel"] != corrected["object_rel"]
                    counts["image_tokens_differ"] += len(paper["image"]) != len(corrected["image"])
                    empty = (not paper["object_rel"], not corrected["object_rel"])
                    counts["object_empty_in_one_mode"] += (sample.box_issue is None) and empty[0] != empty[1]
            print(json.dumps(counts), flush=True)


if __name__ == "__main__":
    main()
