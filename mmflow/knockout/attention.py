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

LAYER_ATTR = "_mmflow_layer"
BACKENDS = {"eager": eager_attention_forward, "sdpa": sdpa_attention_forward}
IMPLEMENTATIONS = {f"mmflow_{name}": name for name in BACKENDS}

_active: contextvars.ContextVar[KnockoutJob | None] = contextvars.ContextVar("mmflow_knockout", default=None)


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


def prepare_model(model, backend: str = "sdpa") -> None:
    """Route the language model's attention through mmflow and tag its decoder layers by index."""
    if backend not in BACKENDS:
        raise ValueError(f"knockout backend must be one of {sorted(BACKENDS)}, got {backend!r}")
    text_config = model.config.get_text_config()
    if text_config.model_type not in {"llama", "mistral", "qwen2"}:
        raise NotImplementedError(f"knockout supports Llama-style decoders, not {text_config.model_type!r}")
    vision_impl = model.config.vision_config._attn_implementation or "sdpa"
    model.set_attn_implementation({"text_config": f"mmflow_{backend}", "vision_config": vision_impl})
    for index, layer in enumerate(language_layers(model)):
        setattr(layer.self_attn, LAYER_ATTR, index)
    check_prepared(model)


def language_layers(model) -> torch.nn.ModuleList:
    """The decoder layers of the language model of a LLaVA-style model."""
    return model.model.language_model.layers


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
def blocking(job: KnockoutJob | None) -> Iterator[None]:
    """Apply `job` to every forward inside the block (None: a clean forward through the same code)."""
    token = _active.set(job)
    try:
        yield
    finally:
        _active.reset(token)
