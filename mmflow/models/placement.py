"""Where a model's weights go when it spans several GPUs (`model.device_map`, `resources.gpus`).

A model whose config asks for more than one GPU (`resources.gpus > 1`, e.g. LLaVA-1.5-13B in half
precision on two 24 GB cards) or names a `device_map` is loaded through `accelerate`'s big-model
inference (`from_pretrained(device_map=…, max_memory=…)`): whole decoder layers are placed on the GPUs
the process sees (under Ray: the ones Ray assigned the actor, through CUDA_VISIBLE_DEVICES), each GPU
filled up to `GPU_MEMORY_FRACTION` of its memory, the rest left for activations and the key/value cache.
Inputs go where the token embeddings are; accelerate's hooks move activations between GPUs.

Source: accelerate's "Big Model Inference" guide (`infer_auto_device_map`, `max_memory`,
`no_split_module_classes`) and transformers' `from_pretrained(device_map=…)`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# The share of each GPU's memory weights may take; the rest holds activations, the clean pass's
# key/value cache and the knockout jobs' rows (about 10-20% of the weights at LLaVA sizes).
GPU_MEMORY_FRACTION = 0.85
GIB = 2**30


def wants_split(device_map: Any, gpus_asked: float | None) -> bool:
    """Whether to load through a device map: the config names one, or asks for more than one GPU."""
    return bool(device_map) or float(gpus_asked or 0) > 1


def max_memory(gpu_bytes: list[int], fraction: float = GPU_MEMORY_FRACTION) -> dict[int | str, int]:
    """`max_memory` for accelerate: `fraction` of each visible GPU (bytes, by index), nothing on the CPU.

    Raises ValueError when no GPU is visible (a split over zero GPUs would silently run on the CPU).
    """
    if not gpu_bytes:
        raise ValueError("a model split over GPUs needs at least one visible GPU; none is visible")
    limits: dict[int | str, int] = {i: int(total * fraction) for i, total in enumerate(gpu_bytes)}
    limits["cpu"] = 0
    return limits


def visible_gpu_bytes() -> list[int]:
    """Total memory of each GPU this process sees (bytes); [] without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return []
    return [torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count())]


def load_kwargs(device_map: Any, gpus_asked: float | None) -> dict[str, Any]:
    """The `from_pretrained` arguments that place a model: {} for one device (moved by the caller);
    otherwise `device_map` (the config's, or "auto") and, on GPUs, per-GPU `max_memory` limits."""
    if not wants_split(device_map, gpus_asked):
        return {}
    kwargs: dict[str, Any] = {"device_map": _plain(device_map) or "auto"}
    gpus = visible_gpu_bytes()
    if gpus and isinstance(kwargs["device_map"], str):
        kwargs["max_memory"] = max_memory(gpus)
    return kwargs


def plan_placement(config, gpu_bytes: list[int], dtype=None) -> tuple[dict[str, int | str], int | str]:
    """The device map `from_pretrained(device_map="auto", max_memory=max_memory(gpu_bytes))` would use
    for `config`, computed on the meta device (no weights, no GPU needed), and the device the inputs go
    to (the token embeddings'). Raises ValueError when the weights do not fit the GPUs' limits.

    `gpu_bytes`: total memory of each GPU (bytes); `dtype`: the weights' torch dtype (default: float16).
    """
    import torch
    from accelerate import infer_auto_device_map, init_empty_weights
    from accelerate.utils import get_balanced_memory

    from mmflow.models.synthetic.builder import model_class

    dtype = dtype or torch.float16
    with init_empty_weights():
        model = model_class(config)(config)
    no_split = list(model._no_split_modules or ())
    # as from_pretrained(device_map="auto") does: balance the limits over the GPUs, then fill in order
    limits = get_balanced_memory(model, max_memory(gpu_bytes), no_split_module_classes=no_split, dtype=dtype)
    placement = infer_auto_device_map(model, max_memory=limits, no_split_module_classes=no_split, dtype=dtype)
    off_gpu = sorted(name for name, device in placement.items() if not isinstance(device, int))
    if off_gpu:
        where = placement[off_gpu[0]]
        raise ValueError(f"the weights do not fit {len(gpu_bytes)} GPU(s): {off_gpu[:3]} would go to {where}")
    embeddings = next(n for n, _ in model.named_modules() if n.endswith("embed_tokens"))
    return dict(placement), device_of(placement, embeddings)


def device_of(placement: Mapping[str, int | str], module: str) -> int | str:
    """The device a device map gives `module` (the entry of the module or of its closest parent)."""
    parts = module.split(".")
    for end in range(len(parts), -1, -1):
        key = ".".join(parts[:end])
        if key in placement:
            return placement[key]
    raise KeyError(f"{module!r} is not placed by the device map")


def _plain(value: Any) -> Any:
    """An OmegaConf mapping as a plain dict (accelerate takes dicts and strings)."""
    if value is None or isinstance(value, str):
        return value
    return {str(k): v for k, v in dict(value).items()}
