"""Training data of toy-llava: scenes, packed question segments, patch and grounding-probe targets."""

from __future__ import annotations

import multiprocessing
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mmflow.data.sample import TASKS
from mmflow.data.shapes import COLORS, QUESTION_MAKERS, SHAPES, SIZES, Scene, draw, make_item, random_scene
from mmflow.inputs.prompts import build_prompt
from mmflow.models.synthetic.tiny import IMAGE_TOKEN
from mmflow.models.synthetic.toy import (
    ATTRIBUTES,
    DESCRIBE,
    PARALLEL_MIN_IMAGES,
    PROMPT_FORMAT,
    VAL_DATA_SEED,
    ToyConfig,
)

# ---------------------------------------------------------------- training data


@dataclass
class Packed:
    """Encoded images, each with its question segments.

    `shared[i]` is image i's prompt up to and including the newline after the image tokens (the
    same for all its questions); `segments[i]` holds (rest of the prompt + answer ids, answer length)
    per question. `patch_labels` gives the object under each patch (colour, shape, size; 0 = none);
    `word_facts` what the image says about each shape and colour word (the grounding targets).
    """

    shared: list[list[int]]
    segments: list[list[tuple[list[int], int]]]
    tasks: list[str]  # the family of image i's first question (for per-family validation)
    pixels: torch.Tensor  # [N, 3, H, W] float16
    patch_labels: torch.Tensor  # [N, 3, n_patches] long
    word_facts: torch.Tensor  # [N, len(NAMING_WORDS), 4] float: see `word_facts`
    word_tokens: tuple[int, ...]  # token id of each of NAMING_WORDS

    def __len__(self) -> int:
        return len(self.shared)


def describe(rng: random.Random, scene: Scene) -> str:
    """A short description of every object in random order: 'circle red small , square blue large .'"""
    objects = list(scene.objects)
    rng.shuffle(objects)
    if rng.random() < 0.5:
        parts = [f"{o.shape} {o.color} {o.size}" for o in objects]
    else:
        parts = [f"{o.color} {o.shape} {o.size}" for o in objects]
    return " , ".join(parts) + " ."


def _scene_questions(
    rng: random.Random, scene: Scene, targets: dict[str, list[bool]]
) -> list[tuple[str, str, str]] | None:
    """A question per yes/no target of each family as (family, question, answer), or None as soon as
    one of them is impossible in `scene`."""
    qa = []
    for task, yes_targets in targets.items():
        for yes in yes_targets:
            q = QUESTION_MAKERS[task](rng, scene, yes)
            if q is None:
                return None
            qa.append((task, q["question"], q["answer"]))
    return qa


def training_scene(cfg: ToyConfig, index: int) -> tuple[Scene, list[tuple[str, str, str]]]:
    """Training image `index`: a scene and its (family, question, answer) triples, made by the shapes
    generator's own makers. As in the held-out generator, the yes/no targets are drawn once and the
    scene is redrawn until it can carry every question, so the targets stay balanced (keeping only
    the questions a scene happens to allow makes "same colour?" a 3:1 "no", learnt as a prior)."""
    rng = random.Random(f"toy:{cfg.train_data_seed}:{index}")
    targets = {task: [rng.random() < 0.5 for _ in range(n)] for task, n in cfg.questions.items()}
    qa = None
    while qa is None:
        scene = random_scene(rng)
        qa = _scene_questions(rng, scene, targets)
    qa += [("Describe", DESCRIBE, describe(rng, scene)) for _ in range(cfg.descriptions)]
    return scene, qa


def patch_labels(scene: Scene, image_size: int, patch_size: int, min_cover: float = 0.2) -> torch.Tensor:
    """[4, n_patches] labels (colour, shape, size of the object covering most of each patch of the
    padded, resized view, at least `min_cover` of it or the box centre; then the patch's column on
    object patches, so that image features carry where an object is; 0 = background)."""
    side = max(scene.width, scene.height)
    scale = image_size / side
    off_x, off_y = (side - scene.width) // 2, (side - scene.height) // 2
    grid = image_size // patch_size
    labels = torch.zeros(4, grid * grid, dtype=torch.long)
    best = torch.full((grid * grid,), min_cover)
    lo = torch.arange(grid) * patch_size
    hi = lo + patch_size
    for obj in scene.objects:
        x, y, w, h = obj.box
        x0, x1 = (x + off_x) * scale, (x + w + off_x) * scale
        y0, y1 = (y + off_y) * scale, (y + h + off_y) * scale
        cover_x = (hi.clamp(max=x1) - lo.clamp(min=x0)).clamp(min=0)
        cover_y = (hi.clamp(max=y1) - lo.clamp(min=y0)).clamp(min=0)
        cover = (cover_y[:, None] * cover_x[None, :]).flatten() / patch_size**2
        centre = int((y0 + y1) / 2 // patch_size) * grid + int((x0 + x1) / 2 // patch_size)
        cover[centre] = max(float(cover[centre]), min_cover + 1e-3)  # every object labels its centre patch
        win = cover > best
        best = torch.where(win, cover, best)
        for a, (pool, value) in enumerate(zip(ATTRIBUTES, (obj.color, obj.shape, obj.size), strict=True)):
            labels[a, win] = pool.index(value) + 1
    columns = torch.arange(grid * grid) % grid + 1
    labels[3] = torch.where(labels[0] > 0, columns, 0)
    return labels


NAMING_WORDS = (*SHAPES, *COLORS)  # words that pick out an object; the grounding probe reads them


def word_facts(scene: Scene) -> torch.Tensor:
    """[len(NAMING_WORDS), 4] grounding targets: for each shape word and colour word, the colour class,
    shape class, size class and centre x (a fraction of the padded square view) of the object it
    names. Class 0 = no such object (then size and x are -1); all -1 when two objects share the word."""
    side = max(scene.width, scene.height)
    off_x = (side - scene.width) // 2
    facts = torch.full((len(NAMING_WORDS), 4), -1.0)
    for k, word in enumerate(NAMING_WORDS):
        objects = [o for o in scene.objects if word in (o.shape, o.color)]
        if not objects:
            facts[k, :2] = 0
        elif len(objects) == 1:
            o = objects[0]
            x = (o.center_x + off_x) / side
            facts[k] = torch.tensor(
                [COLORS.index(o.color) + 1, SHAPES.index(o.shape) + 1, SIZES.index(o.size), x]
            )
    return facts


def encode_scene(processor, scene: Scene, qa: list[tuple[str, str, str]]) -> tuple:
    """(shared ids, segments, pixels, patch labels) of one image and its questions, each segment
    being exactly the tail of the analysis's single-turn prompt for that question + the answer."""
    tok = processor.tokenizer
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    first = build_prompt(PROMPT_FORMAT, qa[0][1])
    enc = processor(
        text=first.text, images=draw(scene), return_tensors="pt", add_special_tokens=first.add_bos
    )
    full = enc["input_ids"][0].tolist()
    n_image = full.count(image_id)
    cut = max(i for i, t in enumerate(full) if t == image_id) + 2  # image tokens and the newline
    segments = []
    for _, question, answer in qa:
        prompt = build_prompt(PROMPT_FORMAT, question)
        ids = tok(prompt.text, add_special_tokens=prompt.add_bos)["input_ids"]
        at = ids.index(image_id)
        ids = ids[:at] + [image_id] * n_image + ids[at + 1 :]
        if ids[:cut] != full[:cut]:
            raise ValueError(f"question {question!r} changes the tokens before it; cannot share the prefix")
        answer_ids = tok(" " + answer, add_special_tokens=False)["input_ids"]
        segments.append((ids[cut:] + answer_ids, len(answer_ids)))
    labels = patch_labels(scene, enc["pixel_values"].shape[-1], processor.patch_size)
    pixels = enc["pixel_values"][0].half().numpy()
    return full[:cut], segments, pixels, labels.numpy(), word_facts(scene).numpy()


_WORKER: dict[str, Any] = {}


def _init_worker(processor_dir: str) -> None:
    from transformers import AutoProcessor

    torch.set_num_threads(1)
    _WORKER["processor"] = AutoProcessor.from_pretrained(processor_dir)


def _encode_job(job: tuple) -> tuple:
    """Worker side (numpy arrays travel as plain pickles; torch tensors would need one fd each)."""
    return encode_scene(_WORKER["processor"], *job)


def word_token_ids(tokenizer) -> tuple[int, ...]:
    """The last token of each of NAMING_WORDS inside a sentence ("Is the circle ...", "a diamond"):
    where the whole word has been read."""
    ids = tuple(tokenizer(" " + word, add_special_tokens=False)["input_ids"][-1] for word in NAMING_WORDS)
    if len(set(ids)) != len(NAMING_WORDS):
        raise ValueError(
            f"naming words must end in distinct tokens: {dict(zip(NAMING_WORDS, ids, strict=True))}"
        )
    return ids


def encode_all(processor, processor_dir: Path, jobs: list[tuple[Scene, list]]) -> Packed:
    """Encode (scene, questions) jobs in order; in 2 worker processes when there are many."""
    if len(jobs) >= PARALLEL_MIN_IMAGES:
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(2, initializer=_init_worker, initargs=(str(processor_dir),)) as pool:
            out = pool.map(_encode_job, jobs, chunksize=32)
    else:
        out = [encode_scene(processor, *job) for job in jobs]
    return Packed(
        shared=[o[0] for o in out],
        segments=[o[1] for o in out],
        tasks=[qa[0][0] for _, qa in jobs],
        pixels=torch.stack([torch.as_tensor(o[2]) for o in out]),
        patch_labels=torch.stack([torch.as_tensor(o[3]) for o in out]),
        word_facts=torch.stack([torch.as_tensor(o[4]) for o in out]),
        word_tokens=word_token_ids(processor.tokenizer),
    )


def training_data(cfg: ToyConfig, processor, processor_dir: Path) -> Packed:
    return encode_all(processor, processor_dir, [training_scene(cfg, i) for i in range(cfg.images)])


def validation_data(cfg: ToyConfig, processor, processor_dir: Path) -> Packed:
    """Single-question items of every family from the shapes generator (data seed VAL_DATA_SEED)."""
    jobs = []
    for i in range(cfg.val_per_task):
        for task in TASKS:
            item = make_item(task, VAL_DATA_SEED, i, i + 1)
            jobs.append((item.scene, [(task, item.row["question"], item.row["answer"])]))
    return encode_all(processor, processor_dir, jobs)


def collate(data: Packed, index: list[int], pad_id: int, eos_id: int) -> dict[str, torch.Tensor]:
    """A batch of packed images: ids, position ids, a [B, 1, T, T] mask (each segment sees the
    shared prefix and itself; padding sees itself only), the answer rows/cols/targets, and the
    grounding probes' positions and targets (every shape and colour word; the last prompt position of
    questions naming a shape, with the facts of the first and last shape named)."""
    length = max(len(data.shared[i]) + sum(len(s) for s, _ in data.segments[i]) for i in index)
    ids = torch.full((len(index), length), pad_id, dtype=torch.long)
    positions = torch.zeros((len(index), length), dtype=torch.long)
    mask = torch.zeros((len(index), 1, length, length), dtype=torch.bool)
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    rows, cols, targets = [], [], []
    ground: list[tuple] = []  # (row, column, facts) read by each grounding probe
    gather: list[tuple] = []
    word_index = {t: k for k, t in enumerate(data.word_tokens)}
    for b, i in enumerate(index):
        cut = len(data.shared[i])
        ids[b, :cut] = torch.tensor(data.shared[i])
        positions[b, :cut] = torch.arange(cut)
        mask[b, 0, :cut, :cut] = causal[:cut, :cut]
        start = cut
        for segment, n_answer in data.segments[i]:
            end = start + len(segment)
            ids[b, start:end] = torch.tensor(segment)
            positions[b, start:end] = torch.arange(cut, cut + len(segment))
            mask[b, 0, start:end, :cut] = True
            mask[b, 0, start:end, start:end] = causal[: len(segment), : len(segment)]
            rows += [b] * (n_answer + 1)  # the prompt's last token predicts the first answer token
            cols += list(range(end - n_answer - 1, end))
            targets += segment[len(segment) - n_answer :] + [eos_id]
            named = [(offset, word_index[t]) for offset, t in enumerate(segment) if t in word_index]
            for offset, k in named:
                ground.append((b, start + offset, data.word_facts[i, k : k + 1]))
            shapes = [k for offset, k in named if offset < len(segment) - n_answer and k < len(SHAPES)]
            if shapes:
                gather.append((b, end - n_answer - 1, data.word_facts[i, [shapes[0], shapes[-1]]]))
            start = end
        pad = torch.arange(start, length)
        mask[b, 0, pad, pad] = True  # a fully masked row would give NaN, and 0 * NaN poisons the rest
    return {
        "input_ids": ids,
        "position_ids": positions,
        "attention_mask": mask,
        "pixel_values": data.pixels[index].float(),
        "rows": torch.tensor(rows),
        "cols": torch.tensor(cols),
        "targets": torch.tensor(targets),
        "patch_labels": data.patch_labels[index],
        **_probe_targets("ground", ground, 1),
        **_probe_targets("gather", gather, 2),
    }


def _probe_targets(name: str, points: list[tuple], n_objects: int) -> dict[str, torch.Tensor]:
    """`{name}_rows`, `{name}_cols` and `{name}_facts` ([n, n_objects, 4]) of one grounding probe."""
    rows, cols, facts = zip(*points, strict=True) if points else ((), (), ())
    return {
        f"{name}_rows": torch.tensor(rows, dtype=torch.long),
        f"{name}_cols": torch.tensor(cols, dtype=torch.long),
        f"{name}_facts": torch.stack(facts) if facts else torch.zeros(0, n_objects, 4),
    }
