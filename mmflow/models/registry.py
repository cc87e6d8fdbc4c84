"""Model configs -> a loaded model and processor, through `from_pretrained` for real and tiny alike.

Loading does not touch attention: the engine that runs knockouts prepares it (`mmflow.knockout`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch

from mmflow.models.anatomy import Anatomy, anatomy_of

log = logging.getLogger(__name__)

MODEL_CLASSES = ("LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class LoadedModel:
    """A model ready for knockouts, with what the rest of the pipeline needs to know about it."""

    name: str
    model: Any
    processor: Any
    path: str  # the local folder or hub id actually loaded
    prompt_format: str
    image_preprocess: str
    device: torch.device

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @cached_property
    def anatomy(self) -> Anatomy:
        """The model's decoder layers, final norm, unembedding and decoder kind (`mmflow.models.anatomy`)."""
        return anatomy_of(self.model)

    @property
    def n_layers(self) -> int:
        """L, the depth of the language model."""
        return self.anatomy.depth


def resolve_checkpoint(checkpoint: str) -> str:
    """The local folder or hub id to load: `tiny:<name>` builds (once) the project's tiny model,
    `toy:<name>` is a committed toy model (`mmflow/toy_weights/<name>`); a local folder or a hub id
    is passed on. Imports no trainer."""
    if checkpoint.startswith("tiny:"):
        from mmflow.models.tiny import ensure_tiny_model

        return str(ensure_tiny_model(checkpoint.removeprefix("tiny:")))
    if checkpoint.startswith("toy:"):
        from mmflow.models.toy import ensure_toy_model

        return str(ensure_toy_model(checkpoint.removeprefix("toy:")))
    return checkpoint


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _apply_preprocess(processor, image_preprocess: str):
    """Make the image processor do what the checkpoint was trained with (METHOD.md: pad vs crop)."""
    if image_preprocess == "pad":
        from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

        ip = processor.image_processor
        processor.image_processor = LlavaImageProcessorPil(
            do_pad=True,
            size=dict(ip.size),
            crop_size=dict(ip.crop_size),
            image_mean=list(ip.image_mean),
            image_std=list(ip.image_std),
            resample=ip.resample,
        )
    elif image_preprocess not in {"crop", "anyres"}:
        raise ValueError(f"image_preprocess must be pad, crop or anyres, got {image_preprocess!r}")
    return processor


def load_model(cfg: Any) -> LoadedModel:
    """Load model + processor named by a `conf/model/*.yaml` config (attention as the checkpoint has it).

    Raises ValueError when the config's `n_layers` differs from the loaded model's depth.
    """
    import transformers
    from transformers import AutoProcessor

    if cfg.model_class not in MODEL_CLASSES:
        raise ValueError(f"model_class must be one of {MODEL_CLASSES}, got {cfg.model_class!r}")
    path = resolve_checkpoint(cfg.checkpoint)
    device = pick_device(cfg.get("device", "auto"))
    trust = bool(cfg.get("trust_remote_code", False))
    revision = cfg.get("revision")
    model = (
        getattr(transformers, cfg.model_class)
        .from_pretrained(
            path,
            dtype=DTYPES[cfg.dtype],
            use_safetensors=True,
            trust_remote_code=trust,
            revision=revision,
        )
        .to(device)
    )
    model.eval()
    processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust, revision=revision)
    processor = _apply_preprocess(processor, cfg.image_preprocess)
    log.info("loaded %s from %s on %s", cfg.name, path, device)
    loaded = LoadedModel(
        name=cfg.name,
        model=model,
        processor=processor,
        path=path,
        prompt_format=cfg.prompt_format,
        image_preprocess=cfg.image_preprocess,
        device=device,
    )
    check_depth(cfg, loaded)
    return loaded


def check_depth(cfg: Any, loaded: LoadedModel) -> None:
    """ValueError when the config's `n_layers` (what the report's axes use) is not the loaded depth."""
    configured = cfg.get("n_layers")
    if configured is not None and int(configured) != loaded.n_layers:
        raise ValueError(
            f"model {cfg.name!r}: the config says n_layers={configured}, but the checkpoint "
            f"{loaded.path!r} has {loaded.n_layers} decoder layers"
        )


_LOADED: dict[str, LoadedModel] = {}
LOAD_COUNT = {"n": 0}  # weight loads done by this process (the launcher reports it per cell)


def get_model(cfg: Any) -> LoadedModel:
    """`load_model`, once per process and model config: later cells reuse the loaded weights."""
    import json

    plain = cfg if isinstance(cfg, dict) else dict(cfg)
    key = json.dumps(plain, sort_keys=True, default=str)
    if key not in _LOADED:
        _LOADED.clear()  # one model per process: free the previous one first
        _LOADED[key] = load_model(cfg if not isinstance(cfg, dict) else _Attr(cfg))
        LOAD_COUNT["n"] += 1
    return _LOADED[key]


class _Attr(dict):
    """Attribute access over a plain config dict (what `load_model` reads)."""

    __getattr__ = dict.get
