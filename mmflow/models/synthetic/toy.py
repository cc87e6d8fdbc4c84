"""toy-llava: a small LLaVA-1.5-architecture model trained by mmflow on the synthetic shapes VQA.

Same classes as the real checkpoints (`LlavaForConditionalGeneration`: CLIP vision tower, MLP
projector, Llama decoder), the vicuna_v1 prompt of the analysis, the SentencePiece-style tokenizer of
`mmflow.models.synthetic.tiny` and LLaVA-1.5's "pad" preprocessing, at a smaller image geometry: 112 px views
and 14 px patches, i.e. 64 image tokens instead of 576.

This module is the model and its checkpoint: the geometry (`ToyConfig`), the untrained model and
processor, and the committed weights folder (`ensure_toy_model`, what `toy:<name>` resolves to).
It imports no trainer: training lives in `mmflow.models.synthetic.toy_training`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from mmflow.data.sample import TASKS
from mmflow.data.shapes import COLORS, SHAPES, SIZES
from mmflow.models.synthetic.builder import (
    ModelSpec,
    TextSpec,
    VisionSpec,
    build_weights,
    model_config,
    token_ids,
)
from mmflow.models.synthetic.processor_builder import ProcessorSpec, make_processor
from mmflow.models.synthetic.tiny import build_tokenizer, tokenizer_corpus

TOY_ROOT = Path(__file__).resolve().parents[2] / "toy_weights"
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
    """The SentencePiece-style tokenizer of mmflow.models.synthetic.tiny and a LLaVA-1.5 'pad' processor."""
    tokenizer = build_tokenizer("sentencepiece", cfg.vocab_size, tokenizer_corpus())
    return make_processor(ProcessorSpec("llava", cfg.image_size, cfg.patch_size), tokenizer)


def build_model(cfg: ToyConfig, tokenizer):
    """A seeded, untrained toy LLaVA (`LlavaForConditionalGeneration`, CLIP + projector + Llama)."""
    t, v = cfg.text_hidden, cfg.vision_hidden
    spec = ModelSpec(
        "llava",
        TextSpec(t, t * 3, cfg.text_layers, cfg.text_heads, cfg.text_heads, max_positions=1024),
        VisionSpec(v, v * 4, cfg.vision_layers, cfg.vision_heads, cfg.image_size, cfg.patch_size, v),
        **token_ids(tokenizer),
        feature_layer=-1,  # the tower is 2 layers deep; LLaVA's -2 would leave one unused
    )
    model = build_weights(model_config(spec), cfg.seed)
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


# ---------------------------------------------------------------- the committed checkpoint


def ensure_toy_model(name: str) -> Path:
    """The committed weights folder of toy model `name` (no training at run time)."""
    if name not in TOY_NAMES:
        raise KeyError(f"unknown toy model {name!r}; known: {list(TOY_NAMES)}")
    folder = TOY_ROOT / name
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"{folder} has no weights; run `python -m mmflow.models.synthetic.toy_training train`"
        )
    return folder
