"""Attribution estimates of per-head (and per-source-token) knockouts from one forward and one backward.

For a knockout `sources -> targets`, blocked in one attention head h of one layer l, the change of the
answer's log-probability is estimated AtP*-style (Kramár et al. 2024, arXiv 2403.00745, the "QK fix"):
the head's softmax over the target rows is recomputed with the edges blocked, from the clean run's own
queries and keys (blocking at layer l changes nothing that enters layer l's attention), which gives the
exact change of the head's output ΔO = (A_blocked - A_clean) V; only what happens after the head is
linearised: estimate = Σ_targets grad(log p wrt the head's output) · ΔO. A knockout (-inf on the
logits) saturates the softmax, where linearising through the softmax itself misses effects; this
correction does not.

One forward with gradients (over the suffix from the first target on, see `answer_gradients`;
mmflow's attention function hands over every layer's post-rotary q, k, v
and mask through `capturing`) and one backward to every layer's head outputs (the inputs of `o_proj`)
serve every layer, head and source token of every knockout type of the sample. A window of several
layers is estimated as the sum of its layers' estimates (first order across layers).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from mmflow.inputs.encode import ModelInputs
from mmflow.knockout.attention import blocking, capturing
from mmflow.knockout.noise import PROBE_FLOOR, dithered_logprobs, probe_tolerance, top_distance
from mmflow.knockout.reference import CleanPass
from mmflow.models.anatomy import DECODERS
from mmflow.models.kv_cache import cache_kwargs
from mmflow.models.registry import LoadedModel

log = logging.getLogger(__name__)
PLAIN_ROTARY = frozenset(k for k, d in DECODERS.items() if d.plain_rotary)  # the suffix run applies


@dataclass
class LayerState:
    """One layer's clean attention inputs and the gradient at its head outputs (batch dim dropped).

    `query` [H, T, d] and `key`/`value` [Hkv, T, d] after rotary; `mask` [T, T] additive (causal, ...);
    `grad` [H, T, d]: d log p(answer) / d head output (the input of `o_proj`, split per head).
    Query, mask and grad rows start at position `offset` (the suffix run's first position; else 0).
    """

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    mask: torch.Tensor
    scaling: float
    grad: torch.Tensor
    offset: int = 0


@dataclass
class Gradients:
    """What one forward + backward of a sample leaves: log p(answer) and every layer's `LayerState`."""

    token_id: int
    logp: float
    layers: list[LayerState]


def answer_gradients(
    loaded: LoadedModel, inputs: ModelInputs, token_id: int, clean: CleanPass | None = None
) -> Gradients:
    """One forward with gradients to the head outputs, and one backward of log p(`token_id`).

    With a fast engine's clean pass (`clean` keeping K/V from its first target t on), only positions
    t..T-1 are run, from layer 0, attending to the clean prefix's cached keys and values: gradients at
    the targets (all >= t) flow through those positions only, so this is exact and costs ~(T-t)/T of a
    full pass. It is checked like the fast engine's probe (log p must match the clean pass); otherwise,
    and without such a pass, the whole sequence runs. Parameters get no gradients, only activations.
    """
    start = _suffix_start(loaded, inputs, clean)
    if start:
        gradients = _run(loaded, token_id, lambda: _suffix_forward(loaded, inputs, clean, start), start)
        if _within_rounding(loaded, inputs, clean, abs(gradients.logp - float(clean.logprobs[token_id]))):
            return gradients
        log.warning("attribution: the suffix run misses the clean log p; running the whole sequence")
    full = lambda: loaded.model(**inputs.tensors, use_cache=False, logits_to_keep=1).logits[0, -1]  # noqa: E731
    return _run(loaded, token_id, full, 0)


def _within_rounding(loaded: LoadedModel, inputs: ModelInputs, clean: CleanPass, diff: float) -> bool:
    """Whether the suffix run's log p is the clean one up to the dtype's measured rounding noise,
    as the fast engine judges its probe (`mmflow.knockout.noise.probe_tolerance`)."""
    if diff <= PROBE_FLOOR:
        return True
    rounding = top_distance(dithered_logprobs(loaded, inputs), clean.logprobs)
    return diff <= probe_tolerance(rounding)


def _suffix_start(loaded: LoadedModel, inputs: ModelInputs, clean: CleanPass | None) -> int:
    """First position of the suffix run (0: run everything): the clean pass's first target, when it
    kept K/V, the decoder uses plain 1-D positions and no image token lies in the suffix."""
    start = getattr(clean, "first_target", None)
    if not start or not getattr(clean, "keys", None) or loaded.anatomy.decoder_kind not in PLAIN_ROTARY:
        return 0
    image = loaded.model.config.image_token_id
    if bool((inputs.tensors["input_ids"][0, start:] == image).any()):
        return 0
    return int(start)


def _suffix_forward(loaded: LoadedModel, inputs: ModelInputs, clean: CleanPass, start: int) -> torch.Tensor:
    """Last-position logits of positions start..T-1 run over the clean prefix's cached K/V."""
    from transformers import DynamicCache

    cache = DynamicCache()
    for index, (key, value) in enumerate(zip(clean.keys, clean.values, strict=True)):
        cache.update(key[None, :, :start].detach(), value[None, :, :start].detach(), index)
    ids = inputs.tensors["input_ids"][:, start:]
    positions = torch.arange(start, inputs.length, device=ids.device)[None]
    hidden = loaded.anatomy.language_model(
        input_ids=ids,
        position_ids=positions,
        cache_position=positions[0],
        use_cache=True,
        **cache_kwargs(loaded.anatomy.language_model, cache),
    ).last_hidden_state
    return loaded.anatomy.unembedding(hidden[0, -1])


def _run(loaded: LoadedModel, token_id: int, forward, offset: int) -> Gradients:
    """Run `forward` (-> last-position logits) with gradients from the input embeddings on, capturing
    every layer's q, k, v and mask and its head outputs; backward of log p(`token_id`)."""
    layers = loaded.anatomy.layers
    captured: dict[int, tuple] = {}
    outputs: dict[int, torch.Tensor] = {}

    def capture(layer, query, key, value, mask, scaling):
        if mask is None:
            raise RuntimeError("attribution needs an explicit attention mask (mmflow attention); got None")
        captured[layer] = (
            query[0].detach(),
            key[0].detach(),
            value[0].detach(),
            mask[0, 0].detach(),
            scaling,
        )

    def keep_output(index):
        def hook(module, args):
            outputs[index] = args[0]

        return hook

    def require_grad(module, args, output):
        return output.detach().requires_grad_()

    handles = [
        layer.self_attn.o_proj.register_forward_pre_hook(keep_output(i)) for i, layer in enumerate(layers)
    ]
    handles.append(loaded.model.get_input_embeddings().register_forward_hook(require_grad))
    try:
        with torch.enable_grad(), blocking(None), capturing(capture):
            logp = torch.log_softmax(forward().float(), dim=-1)[token_id]
            order = sorted(outputs)
            grads = torch.autograd.grad(logp, [outputs[i] for i in order], allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()
    states = []
    for index, grad in zip(order, grads, strict=True):
        query, key, value, mask, scaling = captured[index]
        heads, length, dim = query.shape
        grad = torch.zeros(length, heads * dim) if grad is None else grad[0]
        grad = grad.view(length, heads, dim).transpose(0, 1).float()
        states.append(LayerState(query, key, value, mask, float(scaling), grad, offset))
    return Gradients(token_id, float(logp.detach()), states)


def _heads(tensor: torch.Tensor, heads: int) -> torch.Tensor:
    """[Hkv, T, d] -> [H, T, d] (grouped-query attention: each KV head serves H/Hkv query heads)."""
    return tensor.repeat_interleave(heads // tensor.shape[0], dim=0)


def _attention(state: LayerState, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Clean logits [H, Tt, T] (float32, masked) of the target rows, and the values [H, T, d]."""
    rows = targets - state.offset
    if int(rows.min()) < 0:
        raise ValueError(
            f"target {int(targets.min())} precedes the gradient run's first position {state.offset}"
        )
    query = state.query[:, rows].float()
    heads = query.shape[0]
    key, value = _heads(state.key.float(), heads), _heads(state.value.float(), heads)
    logits = query @ key.transpose(-1, -2) * state.scaling + state.mask[rows].float()
    return logits, value


def head_estimates(state: LayerState, sources: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Estimated Δ log p [H] of blocking `sources -> targets` in each head of this layer alone."""
    logits, value = _attention(state, targets)
    clean = torch.softmax(logits, dim=-1)
    blocked = logits.clone()
    blocked[..., sources] = float("-inf")
    blocked = torch.softmax(blocked, dim=-1).nan_to_num(0.0)  # a fully blocked row: the engines refuse it
    delta = (blocked - clean) @ value  # [H, Tt, d]
    return (state.grad[:, targets - state.offset] * delta).sum(dim=(1, 2))


def source_estimates(state: LayerState, sources: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Estimated Δ log p [H, S] of blocking each single source token s -> `targets`, per head.

    Blocking one key s renormalises the rest: ΔO_t = A_ts / (1 - A_ts) (O_t - V_s), closed form for all s.
    """
    logits, value = _attention(state, targets)
    probs = torch.softmax(logits.double(), dim=-1)  # 1 - A_ts without cancellation for near-saturated rows
    out = probs @ value.double()  # [H, Tt, d]
    grad = state.grad[:, targets - state.offset].double()
    g_out = (grad * out).sum(-1)  # [H, Tt]
    g_value = grad @ value[:, sources].double().transpose(-1, -2)  # [H, Tt, S]
    share = probs[..., sources]
    ratio = share / (1.0 - share).clamp_min(1e-300)
    return (ratio * (g_out[..., None] - g_value)).sum(1).float()


def layer_head_estimates(
    gradients: Gradients, sources: torch.Tensor, targets: torch.Tensor, patches: bool = False
) -> torch.Tensor:
    """Per-layer estimates: [L, H] (the whole source group), or [L, H, S] with `patches` (each source)."""
    estimate = source_estimates if patches else head_estimates
    return torch.stack([estimate(state, sources, targets) for state in gradients.layers])


def window_sum(per_layer: torch.Tensor, windows: list[range]) -> torch.Tensor:
    """Sum the per-layer estimates [L, ...] over each centre's window -> [len(windows), ...]."""
    return torch.stack([per_layer[list(window)].sum(0) for window in windows])
