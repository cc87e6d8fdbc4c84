"""toy-llava: a small LLaVA-1.5-architecture model trained by mmflow on the synthetic shapes VQA.

Same classes as the real checkpoints (`LlavaForConditionalGeneration`: CLIP vision tower, MLP
projector, Llama decoder), the vicuna_v1 prompt of the analysis, the SentencePiece-style tokenizer of
`mmflow.models.tiny` and LLaVA-1.5's "pad" preprocessing, at a smaller image geometry: 112 px views
and 14 px patches, i.e. 64 image tokens instead of 576.

Training, in two stages (deterministic for a seed, data-parallel over 2 processes):
1. the vision tower and projector learn per-patch colour, shape, size and column (a stand-in for
   the pretrained CLIP that real LLaVA starts from);
2. everything learns to answer, with cross-entropy on the answer tokens + EOS. Each training image
   carries 12 single-turn questions of the six families, packed into one sequence: every segment
   sees the shared prefix (system prompt, image) and itself only, at the positions a single-turn
   prompt has, so each segment is exactly the analysis's prompt while the image and prefix are
   computed once. Two training-only probes (`GroundingHead`) ask every shape and colour word to carry
   the colour, shape, size and position of the object it names, and the last prompt position to
   collect those of the first and last shape named: they build an image -> question -> last route
   into the toy on purpose.
The patch loss stays on in stage 2. Held-out evaluation uses other data seeds (unseen images and
questions), and the analysis's own generation and answer normalisation.

    python -m mmflow.models.toy train [--steps N --out DIR --seed S]   # writes a save_pretrained folder
    python -m mmflow.models.toy eval [--path DIR --n N]                 # held-out accuracy per family
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import random
import shlex
import signal
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from mmflow.data.sample import TASKS
from mmflow.data.shapes import COLORS, QUESTION_MAKERS, SHAPES, SIZES, Scene, draw, make_item, random_scene
from mmflow.models.prompts import build_prompt
from mmflow.models.tiny import IMAGE_TOKEN, TinySpec, build_processor, build_tokenizer, tokenizer_corpus

TOY_ROOT = Path(__file__).resolve().parents[1] / "toy_weights"
TOY_NAMES = ("toy-llava",)
PROMPT_FORMAT = "vicuna_v1"
TRAIN_DATA_SEED = 1000  # training scenes use seed TRAIN_DATA_SEED + seed (never a held-out seed)
VAL_DATA_SEED = 999  # the small validation set printed during training
EVAL_DATA_SEED = 0  # held-out evaluation: the data seed of conf/data/shapes.yaml and of the tests
DESCRIBE = "Describe the objects."
PARALLEL_MIN_IMAGES = 256  # below this, encode in-process (no worker start-up)
ATTRIBUTES = (COLORS, SHAPES, SIZES)
AUX_CLASSES = tuple(len(values) + 1 for values in ATTRIBUTES)  # + background


@dataclass(frozen=True)
class ToyConfig:
    """Geometry of the toy model and its training recipe (written to training.json)."""

    image_size: int = 112
    patch_size: int = 14
    vision_hidden: int = 128
    vision_layers: int = 2
    vision_heads: int = 4
    text_hidden: int = 128
    text_layers: int = 6
    text_heads: int = 4
    vocab_size: int = 2000
    seed: int = 0
    images: int = 4000  # training images (each with several questions)
    questions: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TASKS, 2))  # per image
    descriptions: int = 0
    vision_steps: int = 300  # stage 1: vision tower + projector on the patch loss
    vision_batch_size: int = 64
    vision_lr: float = 2e-3
    steps: int = 2000  # stage 2: everything on the answers (+ the patch loss)
    batch_size: int = 8  # images per step (about 100 question segments)
    lr: float = 1e-3
    warmup_steps: int = 100
    decay_from: float = 0.5  # hold the peak rate until this fraction of the steps, then cosine decay
    min_lr_ratio: float = 0.05
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    aux_weight: float = 1.0
    ground_layer: int = 2  # GroundingHead at the shape words reads the residual stream after this layer
    gather_layer: int = 4  # ... and at the last prompt position, after this one
    ground_weight: float = 1.0  # 0 turns the grounding loss off
    val_per_task: int = 50
    val_every: int = 500
    eval_per_task: int = 100
    workers: int = 2  # data-parallel processes (gradients averaged every step)
    threads: int = 1  # per process

    @property
    def train_data_seed(self) -> int:
        return TRAIN_DATA_SEED + self.seed


# ---------------------------------------------------------------- model, tokenizer, processor


def build_processor_for(cfg: ToyConfig):
    """The SentencePiece-style tokenizer of mmflow.models.tiny and a LLaVA-1.5 'pad' processor."""
    tokenizer = build_tokenizer("sentencepiece", cfg.vocab_size, tokenizer_corpus())
    spec = TinySpec("toy-llava", "llava", "sentencepiece", PROMPT_FORMAT, image_size=cfg.image_size)
    return build_processor(replace(spec, patch_size=cfg.patch_size), tokenizer)


def build_model(cfg: ToyConfig, tokenizer):
    """A seeded, untrained toy LLaVA (`LlavaForConditionalGeneration`, CLIP + projector + Llama)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(
        hidden_size=cfg.vision_hidden,
        intermediate_size=cfg.vision_hidden * 4,
        num_hidden_layers=cfg.vision_layers,
        num_attention_heads=cfg.vision_heads,
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        projection_dim=cfg.vision_hidden,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.text_hidden,
        intermediate_size=cfg.text_hidden * 3,
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_heads,
        num_key_value_heads=cfg.text_heads,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_layer=-1,  # the tower is 2 layers deep; LLaVA's -2 would leave one unused
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    torch.manual_seed(cfg.seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


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


# ---------------------------------------------------------------- losses


def decoder_states(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """The decoder's residual stream: embeddings, then the output of every layer (the last one normed)."""
    return model.model(
        input_ids=batch["input_ids"],
        pixel_values=batch["pixel_values"],
        attention_mask=batch["attention_mask"],
        position_ids=batch["position_ids"],
        use_cache=False,
        output_hidden_states=True,
    ).hidden_states


def answer_logits(model, batch: dict[str, torch.Tensor], states: tuple | None = None) -> torch.Tensor:
    """Logits at the answer-predicting positions only (the LM head on a few rows, not all)."""
    hidden = (states or decoder_states(model, batch))[-1]
    return model.lm_head(hidden[batch["rows"], batch["cols"]])


class PatchHead(torch.nn.Module):
    """Training-only linear probe on the projector output: colour (or background), shape and size of
    the object under each patch and the patch's column, the last three scored on object patches
    only. Discarded after training (not part of the saved model)."""

    def __init__(self, model):
        super().__init__()
        vision = model.config.vision_config
        self.classes = (*AUX_CLASSES, vision.image_size // vision.patch_size + 1)  # + the patch column
        self.linear = torch.nn.Linear(model.config.text_config.hidden_size, sum(self.classes))
        self.features: torch.Tensor | None = None
        model.model.multi_modal_projector.register_forward_hook(self._keep)

    def _keep(self, module, args, output) -> None:
        self.features = output

    def loss(self, labels: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over the labels of the features the last forward produced."""
        logits = self.linear(self.features).split(self.classes, dim=-1)
        losses = [
            torch.nn.functional.cross_entropy(
                lg.flatten(0, 1), labels[:, a].flatten(), ignore_index=-1 if a == 0 else 0
            )
            for a, lg in enumerate(logits)
        ]
        return sum(losses) / len(losses)


class GroundingHead(torch.nn.Module):
    """Training-only linear probe on the decoder's residual stream: the colour, shape, size and
    horizontal position in the image of `n_objects` objects named by the text (`word_facts`).

    Two of them build the route the paper found in LLaVA, image -> question -> last, into the toy:
    one reads every shape and colour word after `cfg.ground_layer` (the question tokens fetch the
    facts of the objects they name), one reads the last prompt position after `cfg.gather_layer`
    (it collects the facts of the question's first and last shape word, which the two-object
    families compare). Without them no two-object family left chance within the time budget (with
    them ChooseRel does). Discarded after training (not part of the saved model)."""

    X_WEIGHT = 10.0  # x is a fraction in [0, 1]: its squared error is ~10x smaller than a class loss
    SPLIT = (len(COLORS) + 1, len(SHAPES) + 1, len(SIZES), 1)  # colour, shape (0 = absent), size, x

    def __init__(self, model, n_objects: int):
        super().__init__()
        self.linear = torch.nn.Linear(model.config.text_config.hidden_size, n_objects * sum(self.SPLIT))

    def loss(self, states: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, facts: torch.Tensor):
        """Mean of the colour, shape, size and position losses; `facts` is [n, n_objects, 4]."""
        if len(facts) == 0:
            return states.sum() * 0.0
        out = self.linear(states[rows, cols]).view(-1, sum(self.SPLIT))
        facts = facts.reshape(-1, 4)
        colour, shape, size, x = out.split(self.SPLIT, dim=-1)
        ce = torch.nn.functional.cross_entropy
        losses = [
            ce(colour, facts[:, 0].long(), ignore_index=-1),
            ce(shape, facts[:, 1].long(), ignore_index=-1),
        ]
        known = facts[:, 3] >= 0
        if known.any():
            losses.append(ce(size[known], facts[known, 2].long()))
            losses.append(self.X_WEIGHT * (x[known, 0] - facts[known, 3]).square().mean())
        return sum(losses) / len(losses)


def vision_loss(model, head: PatchHead, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, float]:
    """Stage 1: the patch loss of the vision tower + projector alone (the decoder is not run)."""
    model.model.get_image_features(
        pixel_values=batch["pixel_values"], vision_feature_layer=-1, vision_feature_select_strategy="default"
    )
    loss = head.loss(batch["patch_labels"])
    return loss, loss.item()


def answer_loss(model, heads: dict[str, torch.nn.Module], batch: dict[str, torch.Tensor], cfg: ToyConfig):
    """Stage 2: cross-entropy on the answer tokens + EOS, plus the patch and grounding losses;
    (total, answer part)."""
    states = decoder_states(model, batch)
    answer = torch.nn.functional.cross_entropy(answer_logits(model, batch, states), batch["targets"])
    total = answer + cfg.aux_weight * heads["patch"].loss(batch["patch_labels"])
    if cfg.ground_weight:
        for name, layer in (("ground", cfg.ground_layer), ("gather", cfg.gather_layer)):
            keys = (f"{name}_rows", f"{name}_cols", f"{name}_facts")
            total = total + cfg.ground_weight * heads[name].loss(states[layer], *(batch[k] for k in keys))
    return total, answer.item()


def vision_batch(data: Packed, index: list[int]) -> dict[str, torch.Tensor]:
    return {"pixel_values": data.pixels[index].float(), "patch_labels": data.patch_labels[index]}


# ---------------------------------------------------------------- training


def lr_at(step: int, steps: int, peak: float, cfg: ToyConfig) -> float:
    """Linear warm-up, the peak until `decay_from * steps` (the two-object families are learnt late,
    at a high rate), then cosine decay to `min_lr_ratio * peak`."""
    if step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    hold = max(cfg.warmup_steps, int(cfg.decay_from * steps))
    if step < hold:
        return peak
    progress = (step - hold) / max(1, steps - hold)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return peak * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


def batch_order(n_items: int, steps: int, batch_size: int, seed: int) -> list[list[int]]:
    """Deterministic batches: a fresh seeded permutation of the pool per epoch."""
    gen = torch.Generator().manual_seed(seed)
    flat: list[int] = []
    while len(flat) < steps * batch_size:
        flat += torch.randperm(n_items, generator=gen).tolist()
    return [flat[s * batch_size : (s + 1) * batch_size] for s in range(steps)]


@torch.no_grad()
def first_token_accuracy(model, data: Packed, pad_id: int, eos_id: int) -> dict[str, float]:
    """Teacher-forced accuracy of the answer's first token per family (a cheap progress signal)."""
    model.eval()
    hits: dict[str, list[bool]] = {}
    for start in range(0, len(data), 64):
        index = list(range(start, min(start + 64, len(data))))
        batch = collate(data, index, pad_id, eos_id)
        predicted = answer_logits(model, batch).argmax(-1)
        firsts = torch.nonzero(torch.diff(batch["rows"], prepend=torch.tensor([-1]))).flatten()
        for i, pos in zip(index, firsts.tolist(), strict=True):  # one segment per validation image
            hits.setdefault(data.tasks[i], []).append(bool(predicted[pos] == batch["targets"][pos]))
    model.train()
    return {task: sum(h) / len(h) for task, h in hits.items()}


def make_optimizer(named: list[tuple[str, torch.nn.Parameter]], cfg: ToyConfig) -> torch.optim.Optimizer:
    """AdamW; no weight decay on norms, biases and embeddings."""
    decay = [p for n, p in named if p.ndim >= 2 and "embed" not in n]
    rest = [p for n, p in named if not (p.ndim >= 2 and "embed" not in n)]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98))


@dataclass
class TrainData:
    """Everything a training process needs besides the model."""

    pool: Packed
    val: Packed | None
    pad_id: int
    eos_id: int


def _average(params: list[torch.nn.Parameter], extra: torch.Tensor, world: int) -> torch.Tensor:
    """All-reduce the gradients (and `extra`) of the data-parallel processes and average them."""
    import torch.distributed as dist

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.flatten() for g in grads] + [extra.flatten()])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for p, g in zip(params, grads, strict=True):
        p.grad = flat[offset : offset + g.numel()].view_as(p).clone()
        offset += g.numel()
    return flat[offset:]


@dataclass
class Stage:
    """One optimisation stage: its parameters, loss, batches and schedule."""

    name: str
    named_params: list[tuple[str, torch.nn.Parameter]]
    loss: Any  # batch -> (total loss, logged float)
    make_batch: Any  # index list -> batch
    steps: int
    batch_size: int
    peak_lr: float


def run_stage(rank: int, world: int, stage: Stage, cfg: ToyConfig, n_items: int, on_step=None) -> list[float]:
    """Optimise one stage with AdamW (gradients averaged over processes); returns the logged losses."""
    from tqdm.auto import tqdm

    optimizer = make_optimizer(stage.named_params, cfg)
    params = [p for _, p in stage.named_params]
    losses: list[float] = []
    batches = batch_order(n_items, stage.steps, stage.batch_size, cfg.seed + len(stage.name))
    bar = tqdm(batches, desc=f"toy-llava {stage.name}", unit="step", disable=rank != 0)
    for step, index in enumerate(bar):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, stage.steps, stage.peak_lr, cfg)
        loss, logged = stage.loss(stage.make_batch(index[rank::world]))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if world > 1:
            logged = float(_average(params, torch.tensor([logged]), world)[0])
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        losses.append(logged)
        bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.4f}")
        if on_step is not None:
            on_step(step + 1, bar)
    bar.close()
    return losses


def train_loop(rank: int, world: int, cfg: ToyConfig, out: Path, data: TrainData, sync: str | None) -> None:
    """One data-parallel process (rank 0 of 1 when not distributed); rank 0 validates and saves."""
    import torch.distributed as dist
    from transformers import AutoTokenizer

    torch.set_num_threads(cfg.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{sync}", rank=rank, world_size=world)
    model = build_model(cfg, AutoTokenizer.from_pretrained(out))
    heads = {"patch": PatchHead(model), "ground": GroundingHead(model, 1), "gather": GroundingHead(model, 2)}
    model.train()
    torch.manual_seed(cfg.seed)
    for h in heads.values():  # seeded like the model, independent of the process
        h.linear.reset_parameters()
    head = heads["patch"]
    head_params = [(f"head.{n}", p) for n, p in head.named_parameters()]
    ground_params = [
        (f"{name}.{n}", p) for name in ("ground", "gather") for n, p in heads[name].named_parameters()
    ]
    vision = [(n, p) for n, p in model.named_parameters() if "vision_tower" in n or "projector" in n]
    pool = data.pool
    stage1 = Stage(
        "vision",
        vision + head_params,
        lambda b: vision_loss(model, head, b),
        lambda index: vision_batch(pool, index),
        cfg.vision_steps,
        cfg.vision_batch_size,
        cfg.vision_lr,
    )
    vision_losses = run_stage(rank, world, stage1, cfg, len(pool)) if cfg.vision_steps else []
    history: list[dict] = []

    def validate(step: int, bar) -> None:
        if rank == 0 and data.val is not None and (step % cfg.val_every == 0 or step == cfg.steps):
            acc = first_token_accuracy(model, data.val, data.pad_id, data.eos_id)
            history.append({"step": step, "val_first_token_acc": acc})
            bar.write(f"step {step}: " + " ".join(f"{t}={a:.2f}" for t, a in acc.items()))

    stage2 = Stage(
        "answers",
        list(model.named_parameters()) + head_params + (ground_params if cfg.ground_weight else []),
        lambda b: answer_loss(model, heads, b, cfg),
        lambda index: collate(pool, index, data.pad_id, data.eos_id),
        cfg.steps,
        cfg.batch_size,
        cfg.lr,
    )
    losses = run_stage(rank, world, stage2, cfg, len(pool), validate)
    if rank == 0:
        model.eval()
        model.save_pretrained(out, safe_serialization=True)
        tail = losses[-20:]
        result = {"final_loss": sum(tail) / len(tail), "losses": losses, "vision_losses": vision_losses}
        (out / "_loop.json").write_text(json.dumps({**result, "history": history}))
    if world > 1:
        dist.destroy_process_group()


def train(cfg: ToyConfig, out: Path, command: str) -> dict[str, Any]:
    """Train toy-llava per `cfg` (data-parallel over `cfg.workers` processes), save it to `out` with
    `save_pretrained`, and write and return the training record (training.json)."""
    import tempfile

    started = time.time()
    torch.set_num_threads(cfg.threads)
    processor = build_processor_for(cfg)
    out.mkdir(parents=True, exist_ok=True)
    processor.save_pretrained(out)
    tok = processor.tokenizer
    val = validation_data(cfg, processor, out) if cfg.val_per_task else None
    data = TrainData(training_data(cfg, processor, out), val, tok.pad_token_id, tok.eos_token_id)
    data_seconds = time.time() - started
    if cfg.workers == 1:
        train_loop(0, 1, cfg, out, data, None)
    else:
        import torch.multiprocessing as mp

        with tempfile.TemporaryDirectory(prefix="mmflow-toy-") as sync:
            args = (cfg.workers, cfg, out, data, f"{sync}/store")
            workers = mp.spawn(train_loop, args=args, nprocs=cfg.workers, join=False)
            try:
                while not workers.join():
                    pass
            finally:  # on SIGTERM or a failed worker: no orphaned training process keeps running
                for process in workers.processes:
                    if process.is_alive():
                        process.terminate()
    loop = json.loads((out / "_loop.json").read_text())
    (out / "_loop.json").unlink()
    segments = [s for segs in data.pool.segments for s in segs]
    record = {
        "name": "toy-llava",
        "command": command,
        "seed": cfg.seed,
        "steps": cfg.steps,
        "config": asdict(cfg),
        "image_geometry": f"{cfg.image_size} px view, {cfg.patch_size} px patches, "
        f"{(cfg.image_size // cfg.patch_size) ** 2} image tokens, pad preprocessing",
        "train_data": {
            "scene_seed": f"toy:{cfg.train_data_seed}:<index>",
            "images": len(data.pool),
            "segments": len(segments),
            "descriptions": cfg.descriptions * len(data.pool),
        },
        "data_seconds": round(data_seconds, 1),
        "wall_seconds": round(time.time() - started, 1),
        "final_loss": loop["final_loss"],
        "loss_every_50_steps": loop["losses"][::50],
        "vision_loss_every_50_steps": loop["vision_losses"][::50],
        "history": loop["history"],
        "torch": torch.__version__,
    }
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


# ---------------------------------------------------------------- loading and evaluation


def ensure_toy_model(name: str) -> Path:
    """The committed weights folder of toy model `name` (no training at run time)."""
    if name not in TOY_NAMES:
        raise KeyError(f"unknown toy model {name!r}; known: {list(TOY_NAMES)}")
    folder = TOY_ROOT / name
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} has no weights; run `python -m mmflow.models.toy train`")
    return folder


def model_config(path: Path | str | None = None) -> dict[str, Any]:
    """conf/model/toy-llava.yaml as a dict, optionally pointing at another weights folder."""
    from omegaconf import OmegaConf

    conf = Path(__file__).resolve().parents[1] / "conf" / "model" / "toy-llava.yaml"
    config = OmegaConf.to_container(OmegaConf.load(conf), resolve=True)
    if path is not None:
        config["checkpoint"] = str(path)
    return config


def load_toy(path: Path | str | None = None):
    """The toy model as a `LoadedModel`, through the same loader as every analysis."""
    from mmflow.models.registry import _Attr, load_model

    return load_model(_Attr(model_config(path)))


def evaluate(loaded, n: int, seed: int = EVAL_DATA_SEED, cache_dir: Path | None = None) -> dict[str, float]:
    """Held-out accuracy per family: greedy answer + normalisation exactly as `mmflow.runtime`."""
    from mmflow.data import Sample, load_shapes
    from mmflow.inputs import encode
    from mmflow.runtime import generate_answer, normalise_answer

    accuracy = {}
    for task in TASKS:
        samples = [s for s in load_shapes(task, n, seed=seed, cache_dir=cache_dir) if isinstance(s, Sample)]
        hits = [
            normalise_answer(generate_answer(loaded, encode(loaded, s), 8)) == normalise_answer(s.answer)
            for s in samples
        ]
        accuracy[task] = sum(hits) / max(1, len(hits))
    return accuracy


def _finish_record(out: Path, loaded, n: int) -> dict[str, float]:
    record = json.loads((out / "training.json").read_text())
    accuracy = evaluate(loaded, n) if n > 0 else {}
    record["heldout"] = {"data_seed": EVAL_DATA_SEED, "per_task": n, "accuracy": accuracy}
    record["size_bytes"] = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    return accuracy


# ---------------------------------------------------------------- CLI


TRAIN_OPTIONS = {  # CLI flag -> ToyConfig field
    "--steps": "steps",
    "--seed": "seed",
    "--images": "images",
    "--vision-steps": "vision_steps",
    "--batch-size": "batch_size",
    "--lr": "lr",
    "--workers": "workers",
    "--threads": "threads",
    "--val-n": "val_per_task",
    "--val-every": "val_every",
    "--eval-n": "eval_per_task",
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m mmflow.models.toy", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    tr = sub.add_parser("train", help="train toy-llava and save it with save_pretrained")
    defaults = ToyConfig()
    for flag, name in TRAIN_OPTIONS.items():
        value = getattr(defaults, name)
        tr.add_argument(flag, dest=name, type=type(value), default=value, help=f"default {value}")
    tr.add_argument("--out", type=Path, default=TOY_ROOT / "toy-llava")
    ev = sub.add_parser("eval", help="held-out accuracy per family of a trained toy model")
    ev.add_argument("--path", type=Path, default=None, help="weights folder (default: the committed one)")
    ev.add_argument("--n", type=int, default=ToyConfig.eval_per_task)
    ev.add_argument("--seed", type=int, default=EVAL_DATA_SEED, help="data seed of the held-out items")
    return parser


def train_into(cfg: ToyConfig, out: Path, command: str) -> dict[str, Any]:
    """Train and evaluate in a sibling temporary folder, then swap it into `out`: a crash never
    leaves a half-written weights folder behind."""
    import shutil
    import tempfile

    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        record = train(cfg, work, command)
        record["heldout_accuracy"] = _finish_record(work, load_toy(work), cfg.eval_per_task)
        if out.exists():
            shutil.rmtree(out)
        work.rename(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return record


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.cmd == "train":
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so train_into still removes its work dir
        cfg = ToyConfig(**{name: getattr(args, name) for name in TRAIN_OPTIONS.values()})
        command = "python -m mmflow.models.toy " + shlex.join(sys.argv[1:] if argv is None else argv)
        record = train_into(cfg, args.out, command)
        accuracy = record["heldout_accuracy"]
        print(
            f"trained in {record['wall_seconds']:.0f} s, final loss {record['final_loss']:.4f} -> {args.out}"
        )
    else:
        accuracy = evaluate(load_toy(args.path), args.n, seed=args.seed)
    for task, acc in accuracy.items():
        print(f"{task:12s} {acc:6.1%}")


if __name__ == "__main__":
    main()
