"""Attribution estimates of per-head (and per-source-token) knockouts from one forward and one backward.

For a knockout `sources -> targets`, blocked in one attention head h of one layer l, the change of the
answer's log-probability is estimated AtP*-style (Kramár et al. 2024, arXiv 2403.00745, the "QK fix"):
the head's softmax over the target rows is recomputed with the edges blocked, from the clean run's own
queries and keys (blocking at layer l changes nothing that enters layer l's attention), which gives the
exact change of the head's output ΔO = (A_blocked - A_clean) V; only what happens after the head is
linearised: estimate = Σ_targets grad(log p wrt the head's output) · ΔO. A knockout (-inf on the
logits) saturates the softmax, where linearising through the softmax itself misses effects; this
correction does not.

One forward with gradients (over the suffix from the first target on, see `answer_gradients`; several
samples in one padded batch with `answer_gradients_batch`;
mmflow's attention function hands over every layer's post-rotary q, k, v
and mask through `capturing`) and one backward to every layer's head outputs (the inputs of `o_proj`)
serve every layer, head and source token of every knockout type of the sample. A window of several
layers is estimated as the sum of its layers' estimates (first order across layers).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import torch

from mmflow.inputs.encode import ModelInputs
from mmflow.knockout.attention import blocking, capturing
from mmflow.knockout.clean_pass import CleanPass
from mmflow.knockout.fast import sliding_window_in_use
from mmflow.knockout.noise import PROBE_FLOOR, dithered_logprobs, probe_tolerance, top_distance
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
    return answer_gradients_batch(loaded, [(inputs, token_id, clean)])[0]


def answer_gradients_batch(
    loaded: LoadedModel, items: Sequence[tuple[ModelInputs, int, CleanPass | None]]
) -> list[Gradients]:
    """`answer_gradients` of several samples [(inputs, answer token, clean pass)], in their order.

    The samples that may take the suffix run (see `answer_gradients`) run together: one padded forward
    (prefix caches padded to the longest prefix, suffixes right-padded, a 2-D padding mask, each sample's
    own position ids) and one backward of the sum of their log p, which leaves each sample's gradients
    unchanged as no position attends across samples. Every sample is checked against its clean log p as
    in `answer_gradients`; a sample that fails, or has no suffix run, runs alone over its whole sequence.
    """
    starts = [_suffix_start(loaded, inputs, clean) for inputs, _, clean in items]
    suffix = [i for i, start in enumerate(starts) if start]
    # the padded layout is max(start) + max(suffix) keys long: a sliding window must cut none of them
    padded = max((starts[i] for i in suffix), default=0) + max(
        (items[i][0].length - starts[i] for i in suffix), default=0
    )
    together = suffix and not sliding_window_in_use(loaded, padded)
    out: dict[int, Gradients] = {}
    for batch in [suffix] if together else [[i] for i in suffix]:
        chosen, batch_starts = [items[i] for i in batch], [starts[i] for i in batch]
        forward = partial(_suffix_forward, loaded, chosen, batch_starts)
        spans = [
            (start, inputs.length - start) for (inputs, _, _), start in zip(chosen, batch_starts, strict=True)
        ]
        gradients = _run(loaded, [token for _, token, _ in chosen], forward, spans, max(batch_starts))
        for index, got in zip(batch, gradients, strict=True):
            inputs, token_id, clean = items[index]
            if _within_rounding(loaded, inputs, clean, abs(got.logp - float(clean.logprobs[token_id]))):
                out[index] = got
            else:
                log.warning("attribution: the suffix run misses the clean log p; running the whole sequence")
    for index, (inputs, token_id, _) in enumerate(items):
        if index not in out:
            full = partial(_full_forward, loaded, inputs)
            out[index] = _run(loaded, [token_id], full, [(0, inputs.length)], 0)[0]
    return [out[index] for index in range(len(items))]


def _full_forward(loaded: LoadedModel, inputs: ModelInputs) -> torch.Tensor:
    """Last-position logits [1, V] of the whole sequence."""
    return loaded.model(**inputs.tensors, use_cache=False, logits_to_keep=1).logits[:, -1]


def _within_rounding(loaded: LoadedModel, inputs: ModelInputs, clean: CleanPass, diff: float) -> bool:
    """Whether the suffix run's log p is the clean one up to the dtype's measured rounding noise,
    as the fast engine judges its probe (`mmflow.knockout.noise.probe_tolerance`). The dithered forward
    (one full pass; needed in half precision, where the difference exceeds the floor) is kept on `clean`."""
    if diff <= PROBE_FLOOR:
        return True
    if clean.dithered is None:  # the noise floor and the fast engine's probe read it too: one forward
        clean.dithered = dithered_logprobs(loaded, inputs)
    rounding = top_distance(clean.dithered, clean.logprobs)
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


def _suffix_forward(
    loaded: LoadedModel, items: Sequence[tuple[ModelInputs, int, CleanPass]], starts: list[int]
) -> torch.Tensor:
    """Last-position logits [B, V] of each sample's positions start..T-1, run over its clean prefix's
    cached K/V. Batched: prefixes padded to P = max(starts) (key slots start..P-1 masked), suffixes
    right-padded to the longest (with the sample's last token, masked; its last real row is read)."""
    from transformers import DynamicCache

    prefix = max(starts)
    lengths = [inputs.length - start for (inputs, _, _), start in zip(items, starts, strict=True)]
    width = max(lengths)
    first = items[0][0].tensors["input_ids"]
    ids = torch.empty(len(items), width, dtype=first.dtype, device=first.device)
    positions = torch.empty(len(items), width, dtype=torch.long, device=first.device)
    keep = torch.zeros(len(items), prefix + width, dtype=torch.long, device=first.device)
    for row, ((inputs, _, _), start, length) in enumerate(zip(items, starts, lengths, strict=True)):
        suffix = inputs.tensors["input_ids"][0, start:]
        ids[row] = suffix[-1]
        ids[row, :length] = suffix
        positions[row] = torch.arange(start, start + width, device=first.device)
        keep[row, :start] = 1
        keep[row, prefix : prefix + length] = 1
    cache = DynamicCache()
    for index in range(len(items[0][2].keys)):
        keys, values = (
            _padded([getattr(c, kind)[index] for _, _, c in items], starts, prefix) for kind in KV
        )
        cache.update(keys, values, index)
    hidden = loaded.anatomy.language_model(
        input_ids=ids,
        attention_mask=keep if len(items) > 1 else None,
        position_ids=positions,
        cache_position=torch.arange(prefix, prefix + width, device=first.device),
        use_cache=True,
        **cache_kwargs(loaded.anatomy.language_model, cache),
    ).last_hidden_state
    last = hidden[torch.arange(len(items)), torch.tensor(lengths, device=hidden.device) - 1]
    return loaded.anatomy.unembedding(last)


KV = ("keys", "values")


def _padded(tensors: list[torch.Tensor], starts: list[int], prefix: int) -> torch.Tensor:
    """Each sample's cached [Hkv, T, d] cut to its prefix and zero-padded to `prefix` -> [B, Hkv, P, d]."""
    first = tensors[0]
    out = first.new_zeros(len(tensors), first.shape[0], prefix, first.shape[-1])
    for row, (tensor, start) in enumerate(zip(tensors, starts, strict=True)):
        out[row, :, :start] = tensor[:, :start].detach()
    return out


def _run(
    loaded: LoadedModel, tokens: list[int], forward, spans: list[tuple[int, int]], prefix: int
) -> list[Gradients]:
    """Run `forward` (-> last-position logits [B, V]) with gradients from the input embeddings on,
    capturing every layer's q, k, v and mask and its head outputs; one backward of Σ_b log p_b(token_b).

    Row b holds positions start..start+length-1 (`spans`) at query rows 0..length-1 and key columns
    [0, start) + [prefix, prefix + length); the rest is padding, cut off here."""
    layers = loaded.anatomy.layers
    captured: dict[int, tuple] = {}
    outputs: dict[int, torch.Tensor] = {}

    def capture(layer, query, key, value, mask, scaling):
        if mask is None:
            raise RuntimeError("attribution needs an explicit attention mask (mmflow attention); got None")
        captured[layer] = (query.detach(), key.detach(), value.detach(), mask[:, 0].detach(), scaling)

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
    trained = [p for p in loaded.model.parameters() if p.requires_grad]
    try:
        for parameter in trained:  # the graph then keeps no layer inputs for weight gradients
            parameter.requires_grad_(False)
        with torch.enable_grad(), blocking(None), capturing(capture):
            logits = torch.log_softmax(forward().float(), dim=-1)
            logp = logits[torch.arange(len(tokens)), torch.tensor(tokens, device=logits.device)]
            order = sorted(outputs)
            grads = torch.autograd.grad(logp.sum(), [outputs[i] for i in order], allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()
        for parameter in trained:
            parameter.requires_grad_(True)
    states: list[list[LayerState]] = [[] for _ in spans]
    for index, grad in zip(order, grads, strict=True):
        query, key, value, mask, scaling = captured[index]
        heads, dim = query.shape[1], query.shape[-1]
        shape = (query.shape[0], query.shape[2], heads * dim)
        grad = torch.zeros(shape, device=query.device) if grad is None else grad
        grad = grad.view(grad.shape[0], grad.shape[1], heads, dim).transpose(1, 2).float()
        for row, (start, length) in enumerate(spans):
            states[row].append(
                LayerState(
                    query[row, :, :length],
                    _columns(key[row], start, length, prefix),
                    _columns(value[row], start, length, prefix),
                    _columns(mask[row, ..., None], start, length, prefix)[:length, :, 0],
                    float(scaling),
                    grad[row, :, :length],
                    start,
                )
            )
    return [
        Gradients(token, float(value), layer_states)
        for token, value, layer_states in zip(tokens, logp.detach(), states, strict=True)
    ]


def _columns(tensor: torch.Tensor, start: int, length: int, prefix: int) -> torch.Tensor:
    """Key positions [..., K, x] of the padded layout -> the sample's own [..., start + length, x]."""
    if start == prefix:  # no padding: a view
        return tensor[..., : prefix + length, :]
    return torch.cat([tensor[..., :start, :], tensor[..., prefix : prefix + length, :]], dim=-2)


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
