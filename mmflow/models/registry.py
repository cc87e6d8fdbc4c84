"""Model configs -> a loaded model and processor, through `from_pretrained` for real and tiny alike.

Loading does not touch attention: the engine that runs knockouts prepares it (`mmflow.knockout`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from mmflow.config.parts import ModelSpec, thaw
from mmflow.models.anatomy import Anatomy, anatomy_of
from mmflow.models.placement import load_kwargs
from mmflow.models.provenance import weights_info

log = logging.getLogger(__name__)

MODEL_CLASSES = (
    "LlavaForConditionalGeneration",
    "LlavaNextForConditionalGeneration",
    "LlavaOnevisionForConditionalGeneration",
    "Qwen2_5_VLForConditionalGeneration",
)
# What each image_preprocess value means; all but `pad` are the processor's own defaults.
IMAGE_PREPROCESS = ("pad", "crop", "anyres", "anyres_max_9", "dynamic")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}  # validate.DTYPES


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
    parity: str | None = (
        None  # "paper" | "corrected"; None: a model the paper did not run (mmflow.inputs.parity)
    )
    remote_code: dict[str, Any] | None = None  # trust_remote_code: the checkpoint's Python files that ran
    weights: dict[str, Any] = field(default_factory=dict)  # mmflow.models.provenance.weights_info

    @property
    def info(self) -> dict[str, Any]:
        """What was really loaded (`cell.json`'s `model_info`): depth, path, replica, random weights."""
        return {**self.weights, "n_layers": self.n_layers, "path": str(self.path)}

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
    `replica:<name>` the CPU replica of a real checkpoint (`mmflow.models.synthetic.replica`),
    `toy:<name>` is a
    committed toy model (`mmflow/toy_weights/<name>`); a local folder or a hub id is passed on.
    Imports no trainer."""
    if checkpoint.startswith("tiny:"):
        from mmflow.models.synthetic.tiny_series import ensure_model as ensure_tiny_model

        return str(ensure_tiny_model(checkpoint.removeprefix("tiny:")))
    if checkpoint.startswith("replica:"):
        from mmflow.models.synthetic.replica import ensure_replica

        return str(ensure_replica(checkpoint.removeprefix("replica:")))
    if checkpoint.startswith("toy:"):
        from mmflow.models.synthetic.toy import ensure_toy_model

        return str(ensure_toy_model(checkpoint.removeprefix("toy:")))
    if checkpoint.startswith("~") or "$" in checkpoint:  # a local folder written with `~` or a variable
        from mmflow.config.paths import expand_path

        return expand_path(checkpoint, "model.checkpoint")
    return checkpoint


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _apply_preprocess(processor, image_preprocess: str):
    """Make the image processor do what the checkpoint was trained with (docs/method.md: pad vs crop)."""
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
    elif image_preprocess not in IMAGE_PREPROCESS:
        raise ValueError(f"image_preprocess must be one of {IMAGE_PREPROCESS}, got {image_preprocess!r}")
    return processor


def pin_pil_backend(processor, path: str, **kwargs):
    """Use the PIL image processor, as the checkpoints were trained with (transformers 5 picks a
    torchvision one, which resizes differently, whenever torchvision is installed)."""
    if not type(processor.image_processor).__name__.endswith("Pil"):
        from transformers import AutoImageProcessor

        processor.image_processor = AutoImageProcessor.from_pretrained(path, backend="pil", **kwargs)
    return processor


def apply_parity(model, processor, parity: str | None) -> None:
    """`parity=paper`: pick anyres tiles as the original code does, in the processor and the model alike."""
    from mmflow.inputs.parity import check_parity, paper_pinpoints

    check_parity(parity, "model.parity")
    pinpoints = getattr(model.config, "image_grid_pinpoints", None)
    if parity == "paper" and pinpoints:
        model.config.image_grid_pinpoints = paper_pinpoints(pinpoints)
        processor.image_processor.image_grid_pinpoints = paper_pinpoints(pinpoints)


def load_model(cfg: ModelSpec) -> LoadedModel:
    """Load model + processor named by a `conf/model/*.yaml` config (`ModelSpec.from_mapping`; attention
    as the checkpoint has it).

    Raises ValueError when the config's `n_layers` differs from the loaded model's depth.
    """
    import transformers

    from mmflow.inputs.processors import load_processor

    if cfg.model_class not in MODEL_CLASSES:
        raise ValueError(f"model_class must be one of {MODEL_CLASSES}, got {cfg.model_class!r}")
    path = resolve_checkpoint(cfg.checkpoint)
    device = pick_device(cfg.device)
    trust = bool(cfg.trust_remote_code)
    revision = cfg.revision
    # a model over several GPUs (resources.gpus > 1 or a device_map): mmflow.models.placement
    resources = cfg.resources or {}
    placement = load_kwargs(thaw(cfg.device_map), resources.get("gpus"))  # a plain dict map
    remote = None
    if trust:  # said before any of the checkpoint's code runs, when its files are already here
        from mmflow.models.remote_code import local_folder, report_remote_code

        if local_folder(path, revision) is not None:
            remote = report_remote_code(cfg.name, path, revision)
    model = getattr(transformers, cfg.model_class).from_pretrained(
        path,
        dtype=DTYPES[cfg.dtype],
        use_safetensors=True,
        trust_remote_code=trust,
        revision=revision,
        **placement,
    )
    if placement:
        device = model.get_input_embeddings().weight.device  # inputs go where the embeddings are
        devices = sorted({str(d) for d in (getattr(model, "hf_device_map", None) or {"": device}).values()})
        log.info("%s placed by device map on %s", cfg.name, ", ".join(devices))
    else:
        model = model.to(device)
    model.eval()
    processor = load_processor(path, cfg.model_class, trust_remote_code=trust, revision=revision)
    processor = pin_pil_backend(processor, path, trust_remote_code=trust, revision=revision)
    processor = _apply_preprocess(processor, cfg.image_preprocess)
    apply_parity(model, processor, cfg.parity)
    log.info("loaded %s from %s on %s", cfg.name, path, device)
    loaded = LoadedModel(
        name=cfg.name,
        model=model,
        processor=processor,
        path=path,
        prompt_format=cfg.prompt_format,
        image_preprocess=cfg.image_preprocess,
        device=device,
        parity=cfg.parity,
        weights=weights_info(cfg.checkpoint, path, cfg.n_layers),
    )
    if trust and remote is None:  # a hub checkpoint: its files are known once downloaded
        remote = report_remote_code(cfg.name, path, revision)
    loaded.remote_code = remote
    check_depth(cfg, loaded)
    return loaded


def check_depth(cfg: ModelSpec, loaded: LoadedModel) -> None:
    """ValueError when the config's `n_layers` (what the report's axes use) is not the loaded depth.

    A shrunk replica (`mmflow.models.synthetic.replica`, `replica.json` with `full_size: false`)
    stands in for the
    real depth on purpose: its own depth is used, and the log says so.
    """
    configured = cfg.n_layers
    if configured is None or int(configured) == loaded.n_layers:
        return
    marker = Path(loaded.path) / "replica.json"
    if marker.is_file() and not json.loads(marker.read_text()).get("full_size", True):
        log.info("%s: shrunk replica with %d layers (config: %s)", cfg.name, loaded.n_layers, configured)
        return
    raise ValueError(
        f"model {cfg.name!r}: the config says n_layers={configured}, but the checkpoint "
        f"{loaded.path!r} has {loaded.n_layers} decoder layers"
    )


_LOADED: dict[str, LoadedModel] = {}
LOAD_COUNT = {"n": 0}  # weight loads done by this process (the launcher reports it per cell)


def get_model(cfg: ModelSpec | Mapping[str, Any]) -> LoadedModel:
    """`load_model`, once per process and model config: later cells reuse the loaded weights.

    A plain model config is made a `ModelSpec` first (`CellConfigError` naming a misspelt key)."""
    import json

    spec = cfg if isinstance(cfg, ModelSpec) else ModelSpec.from_mapping(cfg)
    key = json.dumps(spec.to_dict(), sort_keys=True, default=str)
    if key not in _LOADED:
        _LOADED.clear()  # one model per process: free the previous one first
        _LOADED[key] = load_model(spec)
        LOAD_COUNT["n"] += 1
    return _LOADED[key]
