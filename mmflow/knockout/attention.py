"""The registered attention function that applies knockouts inside the language model only.

transformers dispatches every attention module through `AttentionInterface`; mmflow registers
`mmflow_eager` and `mmflow_sdpa`, which wrap the stock functions and, for the decoder layers tagged
by `prepare_model`, set blocked scores to minus infinity before the softmax (all heads, or the job's
`heads` only, on top of the causal mask). The vision tower keeps a stock implementation and is never touched.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask
from transformers.models.llama.modeling_llama import eager_attention_forward

from mmflow.knockout.spec import KnockoutJob
from mmflow.models.anatomy import DECODERS, anatomy_of

LAYER_ATTR = "_mmflow_layer"
BACKENDS = {"eager": eager_attention_forward, "sdpa": sdpa_attention_forward}
IMPLEMENTATIONS = {f"mmflow_{name}": name for name in BACKENDS}

_active: contextvars.ContextVar[KnockoutJob | None] = contextvars.ContextVar("mmflow_knockout", default=None)
# A callable (layer, query, key, value, mask, scaling) that sees every language layer's attention inputs
# (post-rotary, before any knockout); `mmflow.knockout.attribution` reads the clean q, k, v with it.
_capture: contextvars.ContextVar = contextvars.ContextVar("mmflow_capture", default=None)


def _blocked(module: torch.nn.Module, query: torch.Tensor, kv_length: int) -> torch.Tensor | None:
    """The [q, kv] block mask ([H, q, kv] for a per-head job) under the active job, or None."""
    job = _active.get()
    layer = getattr(module, LAYER_ATTR, None)
    if job is None or layer is None or layer not in job.layers:
        return None
    q_len = query.shape[-2]
    q_positions = torch.arange(kv_length - q_len, kv_length, device=query.device)
    blocked = job.edges.mask(q_positions, kv_length)
    if job.heads is None:
        return blocked
    per_head = torch.zeros(query.shape[1], *blocked.shape, dtype=torch.bool, device=query.device)
    per_head[list(job.heads)] = blocked  # [H, q, kv]: only the chosen heads are blocked
    return per_head


def _make_forward(backend: str):
    base = BACKENDS[backend]

    def forward(module, query, key, value, attention_mask, **kwargs):
        capture, layer = _capture.get(), getattr(module, LAYER_ATTR, None)
        if capture is not None and layer is not None:
            capture(layer, query, key, value, attention_mask, kwargs.get("scaling") or module.scaling)
        blocked = _blocked(module, query, key.shape[-2])
        if blocked is not None:
            if attention_mask is None:
                raise RuntimeError("mmflow knockout needs an explicit attention mask; got None")
            attention_mask = attention_mask.masked_fill(blocked, float("-inf"))
        return base(module, query, key, value, attention_mask, **kwargs)

    forward.__name__ = f"mmflow_{backend}_attention"
    return forward


def _full_mask(*args, **kwargs):
    """A float mask (0 / -inf) that is never skipped, so the knockout always has a mask to edit."""
    kwargs["allow_is_causal_skip"] = False
    return eager_mask(*args, **kwargs)


for _impl, _backend in IMPLEMENTATIONS.items():
    AttentionInterface.register(_impl, _make_forward(_backend))
    AttentionMaskInterface.register(_impl, _full_mask)


def prepare_model(model, backend: str) -> None:
    """Route the language model's attention through mmflow and tag its decoder layers by index."""
    if backend not in BACKENDS:
        raise ValueError(f"knockout backend must be one of {sorted(BACKENDS)}, got {backend!r}")
    reason = knockout_undefined_reason(model.config)
    if reason is not None:
        raise NotImplementedError(reason)
    anatomy = anatomy_of(model)
    vision_impl = model.config.vision_config._attn_implementation or "sdpa"
    model.set_attn_implementation({"text_config": f"mmflow_{backend}", "vision_config": vision_impl})
    for index, layer in enumerate(anatomy.layers):
        setattr(layer.self_attn, LAYER_ATTR, index)
    check_prepared(model)


# Decoder families whose attention over the image is causal self-attention, like the text's.
CAUSAL_DECODERS = frozenset(DECODERS)
# Families where "block source -> target before the softmax" is not the paper's knockout, and why.
_CROSS = "vision enters through cross-attention layers, not through self-attention over image tokens"
_BIDIRECTIONAL = "image tokens attend to each other bidirectionally, so blocking is not the causal knockout"
UNDEFINED = {
    "mllama": _CROSS,
    "gemma3": _BIDIRECTIONAL,
    "gemma3_text": _BIDIRECTIONAL,
    "paligemma": "image and prefix attend bidirectionally (prefix-LM): blocking is not the causal knockout",
}


def knockout_undefined_reason(config) -> str | None:
    """Why the attention knockout is not defined (or not supported) for this model, or None if it is."""
    text = config.get_text_config()
    for model_type in (config.model_type, text.model_type):
        if model_type in UNDEFINED:
            return f"attention knockout is not defined for {model_type!r}: {UNDEFINED[model_type]}"
    if getattr(text, "cross_attention_layers", None):
        return f"attention knockout is not defined for {text.model_type!r}: {_CROSS}"
    if text.model_type not in CAUSAL_DECODERS:
        return (
            f"knockout supports causal decoders {sorted(CAUSAL_DECODERS)}, not {text.model_type!r} "
            "(add it once its image attention is checked to be causal self-attention)"
        )
    return None


def check_prepared(model) -> None:
    """Refuse models whose language attention would silently ignore the knockout mask."""
    impl = model.config.get_text_config()._attn_implementation
    if impl not in IMPLEMENTATIONS:
        raise RuntimeError(
            f"language model attention is {impl!r}; knockouts need one of {sorted(IMPLEMENTATIONS)} "
            "(flash attention ignores arbitrary masks)"
        )
    if model.config.vision_config._attn_implementation in IMPLEMENTATIONS:
        raise RuntimeError("the vision tower must not use the knockout attention")


@contextlib.contextmanager
def capturing(callback) -> Iterator[None]:
    """Call `callback(layer, query, key, value, mask, scaling)` from every language attention inside."""
    token = _capture.set(callback)
    try:
        yield
    finally:
        _capture.reset(token)


@contextlib.contextmanager
def blocking(job: KnockoutJob | None) -> Iterator[None]:
    """Apply `job` to every forward inside the block (None: a clean forward through the same code)."""
    token = _active.set(job)
    try:
        yield
    finally:
        _active.reset(token)
