"""The fast engine: recompute only what a knockout can change, exactly, for all jobs of a sample at once.

Why it is exact (METHOD.md, "Knockout"): blocking edges into targets B changes nothing at positions
before the first affected target b0 (causal attention) nor below the window's first layer lo. So the
clean pass (the reference's own forward, no job active) keeps, per layer, the post-rotary keys/values
of the whole sequence and the layer inputs from the earliest planned target on; each job then
recomputes only its suffix rows b0..T-1 from layer lo up, with the decoder layer's own submodules and
the clean run's rotary tables (original position ids), attending to the cached clean prefix.

Batching: all jobs of a sample run in one pass over the layers. A job is a row that joins the batch at
its window's first layer; rows with the same b0 form a group (every window of every knockout type into
the same targets). Norms, projections and MLPs run once over all rows' suffix tokens; attention runs
per group in two exact pieces merged by their log-sum-exp: every row's queries over the shared clean
prefix, folded into the query dimension so the prefix is never copied per row, and each row over its
own suffix keys with the causal mask. Blocked (target, source) entries are -inf before the softmax,
all heads, in the row's window layers only; the softmax accumulates in float32.

Where the shortcut is not exact or not supported (non-Llama decoders, sliding-window attention,
soft-capped logits) `make_fast_engine` returns the reference engine, named as a fallback. At run time
a probe row per clean pass (the shortest planned suffix, recomputed from layer 0 with nothing blocked)
must reproduce the clean log-probs, else that sample falls back to the reference engine and the
engine's name says so.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers.models.llama.modeling_llama import rotate_half

from mmflow.hooks import record_layer_inputs
from mmflow.inputs import ModelInputs
from mmflow.knockout.attention import IMPLEMENTATIONS, blocking, language_layers
from mmflow.knockout.reference import CleanPass, ReferenceEngine, check_no_empty_rows
from mmflow.knockout.spec import KnockoutJob
from mmflow.models.registry import LoadedModel

log = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = frozenset({"llama", "mistral"})
SUPPORTED_LAYERS = frozenset({"LlamaDecoderLayer", "MistralDecoderLayer"})
# The probe row (no knockout) must reproduce the clean log-probs of the clean top tokens this closely.
PROBE_TOLERANCE = {torch.float32: 1e-4, torch.float16: 5e-2, torch.bfloat16: 1e-1}
PROBE_TOP = 10
# Suffix tokens one pass over the layers may hold, in sequence lengths: bounds the MLP activations of a
# sweep near those of the clean pass (a custom knockout with an early target has ~T tokens per row).
SWEEP_TOKENS = 2


@dataclass
class FastCleanPass(CleanPass):
    """The clean pass plus the caches the fast engine restarts from.

    `keys`/`values`: per layer [Hkv, T, d], after rotary. `hidden` [L, T - start, D]: the input of
    every layer at positions start..T-1. `cos`/`sin` [T - start, d]: the clean run's rotary tables at
    the same positions. Left empty when no knockout was planned (`start` None).
    """

    start: int | None = None
    keys: list[torch.Tensor] = field(default_factory=list)
    values: list[torch.Tensor] = field(default_factory=list)
    hidden: torch.Tensor | None = None
    cos: torch.Tensor | None = None
    sin: torch.Tensor | None = None
    probed: bool = False  # the probe row already reproduced this clean pass


def unsupported_reason(loaded: LoadedModel) -> str | None:
    """Why the suffix recompute would not be exact for this model, or None if it is."""
    model = loaded.model
    text = model.config.get_text_config()
    if text.model_type not in SUPPORTED_MODEL_TYPES:
        return f"decoder {text.model_type!r} is not Llama-style"
    if getattr(text, "sliding_window", None) is not None:
        return "sliding-window attention"
    if any(kind != "full_attention" for kind in getattr(text, "layer_types", None) or ()):
        return "layers without full causal attention"
    for name in ("attn_logit_softcapping", "final_logit_softcapping"):
        if getattr(text, name, None) is not None:
            return f"{name} is set"
    kinds = {type(layer).__name__ for layer in language_layers(model)}
    if not kinds <= SUPPORTED_LAYERS:
        return f"decoder layers {sorted(kinds)} are not Llama-style"
    if text._attn_implementation not in IMPLEMENTATIONS:
        return f"language attention {text._attn_implementation!r} is not mmflow's"
    if model.training:
        return "model is in training mode (dropout)"
    return None


def make_fast_engine(loaded: LoadedModel) -> ReferenceEngine:
    """The fast engine, or the reference engine named as a fallback when the shortcut is not exact."""
    reason = unsupported_reason(loaded)
    if reason is None:
        return FastEngine(loaded)
    log.warning("engine=fast falls back to the reference engine: %s", reason)
    engine = ReferenceEngine(loaded)
    engine.name = f"reference (fallback: {reason})"
    return engine


def _effective_first_target(job: KnockoutJob, n_layers: int) -> int | None:
    """The first target the job can change (b0), or None if it blocks nothing the causal mask allows."""
    sources, targets = job.edges.sources, job.edges.targets
    if sources.numel() == 0 or targets.numel() == 0 or not any(0 <= j < n_layers for j in job.layers):
        return None
    if job.heads is not None and not job.heads:  # blocks in no head
        return None
    reachable = targets[targets >= sources.min()]
    return int(reachable.min()) if reachable.numel() else None


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of x [..., S, d] with tables [S, d] (the Llama formula)."""
    return x * cos + rotate_half(x) * sin


class FastEngine(ReferenceEngine):
    """Suffix-only, window-onward recompute of every knockout of a sample, batched over its rows."""

    def __init__(self, loaded: LoadedModel):
        super().__init__(loaded)
        self.layers = language_layers(loaded.model)
        self.norm = loaded.model.model.language_model.norm
        self.lm_head = loaded.model.lm_head
        self.fallbacks: Counter[str] = Counter()  # samples (or job sets) that needed the reference engine

    @property
    def name(self) -> str:
        if not self.fallbacks:
            return "fast"
        reasons = "; ".join(f"{reason} x{n}" for reason, n in self.fallbacks.items())
        return f"fast (reference fallback on some samples: {reasons})"

    # ------------------------------------------------------------------ clean pass

    @torch.no_grad()
    def clean(self, inputs: ModelInputs, capture_from: int | None = None) -> FastCleanPass:
        """The reference's clean forward (same code, no job), keeping K/V and inputs from `capture_from`."""
        if capture_from is None:
            base = super().clean(inputs)
            return FastCleanPass(base.inputs, base.logprobs, base.last_hidden, base.cache, base.logits)
        with record_layer_inputs(self.layers, capture_from, last=True) as record, blocking(None):
            out = self.loaded.model(**inputs.tensors, use_cache=True, logits_to_keep=1)
        cache = out.past_key_values
        return FastCleanPass(
            inputs,
            torch.log_softmax(out.logits[0, -1].float(), dim=-1),
            torch.stack(record["last"]),
            cache=cache,
            logits=out.logits[0, -1],
            start=capture_from,
            keys=[layer.keys[0] for layer in cache.layers],
            values=[layer.values[0] for layer in cache.layers],
            hidden=torch.stack(record["inputs"]),
            cos=record["rotary"][0],
            sin=record["rotary"][1],
        )

    # ------------------------------------------------------------------ knockouts

    def run(self, clean: CleanPass, jobs: Sequence[KnockoutJob]) -> torch.Tensor:
        """Last-position log-probs [J, V] for each job, in job order."""
        length, n_layers = clean.inputs.length, len(self.layers)
        for job in jobs:
            check_no_empty_rows(job, length)
        out = clean.logprobs.expand(len(jobs), -1).clone()  # jobs that change nothing keep p_base exactly
        by_b0: dict[int, list[int]] = {}
        reference: list[int] = []
        for index, job in enumerate(jobs):
            b0 = _effective_first_target(job, n_layers)
            if b0 is None:
                continue
            if not isinstance(clean, FastCleanPass) or clean.start is None or b0 < clean.start:
                reference.append(index)
            else:
                by_b0.setdefault(b0, []).append(index)
        if reference:
            log.warning("%d knockouts target positions the clean pass did not cache", len(reference))
            self.fallbacks["targets before capture_from"] += 1
        for batch in _batches(by_b0, length):
            rows = self._sweep(clean, batch, jobs)
            if rows is None:  # the probe failed: the shortcut is not exact for this sample
                reference.extend(i for indices in by_b0.values() for i in indices)
                break
            out[list(rows)] = torch.stack(list(rows.values()))
        for index in sorted(reference):
            out[index] = self.last_logprobs(clean.inputs, jobs[index])
        return out

    @torch.no_grad()
    def _sweep(
        self, clean: FastCleanPass, by_b0: dict[int, list[int]], jobs: Sequence[KnockoutJob]
    ) -> dict[int, torch.Tensor] | None:
        """{job index: log-probs [V]} for the jobs in `by_b0`, in one pass over the layers.

        None if the probe row fails: added once per clean pass, from layer 0, to the group with the
        shortest suffix (the cheapest; it still runs every layer's prefix attention and MLP).
        """
        probe = not clean.probed
        groups = []
        for b0 in sorted(by_b0):
            indices = by_b0[b0] + ([-1] if probe and b0 == max(by_b0) else [])
            groups.append(_Group.build(clean, b0, indices, jobs))
        self._forward(clean, groups)
        top = torch.cat([group.hidden[:, -1] for group in groups])  # [R, D]
        logprobs = torch.log_softmax(self.lm_head(self.norm(top)).float(), dim=-1)
        order = [index for group in groups for index in group.rows.jobs]
        result = {index: row for index, row in zip(order, logprobs, strict=True) if index >= 0}
        if probe and not self._probe_ok(clean, logprobs[order.index(-1)]):
            return None
        clean.probed = True
        return result

    def _probe_ok(self, clean: CleanPass, logprobs: torch.Tensor) -> bool:
        """Whether the no-knockout row reproduced the clean log-probs of the clean pass's top tokens."""
        tolerance = PROBE_TOLERANCE.get(self.loaded.model.dtype, 1e-1)
        top = clean.logprobs.topk(PROBE_TOP).indices
        diff = float((logprobs[top] - clean.logprobs[top]).abs().max())
        if diff <= tolerance:
            return True
        log.warning("fast engine probe differs from the clean pass by %.3g; using the reference engine", diff)
        self.fallbacks["probe mismatch"] += 1
        return False

    def _forward(self, clean: FastCleanPass, groups: list[_Group]) -> None:
        """Run every group's rows from their start layers to the top (each group's hidden -> [R, 1, D])."""
        for index in range(min(group.rows.starts[0] for group in groups), len(self.layers)):
            for group in groups:
                group.join(index, clean)
            self._layer(index, [group for group in groups if group.hidden.shape[0]], clean)

    def _layer(self, index: int, groups: list[_Group], clean: FastCleanPass) -> None:
        """Decoder layer `index` on the active rows of every group, token-wise parts batched together.

        Norms, projections and the MLP run once over all suffix tokens [N, D]; attention runs per group
        (each has its own prefix length). At the top layer only each row's last position is kept.
        """
        layer = self.layers[index]
        attn = layer.self_attn
        sizes = [group.hidden.shape[0] * group.hidden.shape[1] for group in groups]
        x = layer.input_layernorm(_cat([group.hidden.flatten(0, 1) for group in groups]))  # [N, D]
        keys, values = attn.k_proj(x).split(sizes), attn.v_proj(x).split(sizes)
        outs, residual = [], []
        for group, xg, kg, vg in zip(groups, x.split(sizes), keys, values, strict=True):
            out = self._attend(index, group, xg, kg, vg, clean)  # [R, Sq, H*d]
            outs.append(out.flatten(0, 1))
            residual.append(group.hidden[:, -out.shape[1] :].flatten(0, 1))
        hidden = _cat(residual) + attn.o_proj(_cat(outs))
        hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        for group, h in zip(groups, hidden.split([len(o) for o in outs]), strict=True):
            group.hidden = h.view(group.hidden.shape[0], -1, h.shape[-1])

    def _attend(
        self,
        index: int,
        group: _Group,
        x: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        clean: FastCleanPass,
    ) -> torch.Tensor:
        """Self-attention output [R, Sq, H*d] of one group's rows, from their normed inputs x [R*S, D]
        and projected keys/values k, v [R*S, Hkv*d]. Sq = S, or 1 at the top layer.
        """
        attn = self.layers[index].self_attn
        d = attn.head_dim
        n_rows, length = group.hidden.shape[:2]
        n_q = 1 if index == len(self.layers) - 1 else length
        q = attn.q_proj(x.view(n_rows, length, -1)[:, -n_q:]).view(n_rows, n_q, -1, d).transpose(1, 2)
        k = k.view(n_rows, length, -1, d).transpose(1, 2)  # [R, Hkv, S, d]
        v = v.view(n_rows, length, -1, d).transpose(1, 2)
        q, k = (
            _rotate(q, group.cos[-n_q:], group.sin[-n_q:]),
            _rotate(k, group.cos, group.sin),
        )  # [R, H, Sq, d]
        blocked = group.rows.at_layer(index, n_rows, q.shape[1])
        out, lse = attend_suffix(q, k, v, group.rows.causal, blocked, attn.scaling)
        if group.b0:  # the clean prefix [Hkv, b0, d], shared by every row
            prefix = (clean.keys[index][:, : group.b0], clean.values[index][:, : group.b0])
            out = _merge((out, lse), attend_prefix(q, *prefix, blocked.prefix_sets(n_q), attn.scaling))
        return out.transpose(1, 2).reshape(n_rows, n_q, -1)


def _batches(by_b0: dict[int, list[int]], length: int) -> list[dict[int, list[int]]]:
    """Split {b0: job indices} into sweeps of at most SWEEP_TOKENS x T suffix tokens (at least one row each).

    Short suffixes come first, so the first sweep holds the cheap group the probe row joins.
    """
    batches: list[dict[int, list[int]]] = [{}]
    used = 0
    for b0 in sorted(by_b0, reverse=True):
        for index in by_b0[b0]:
            if batches[-1] and used + length - b0 > SWEEP_TOKENS * length:
                batches.append({})
                used = 0
            batches[-1].setdefault(b0, []).append(index)
            used += length - b0
    return [batch for batch in batches if batch]


def _cat(tensors: list[torch.Tensor], dim: int = 0) -> torch.Tensor:
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=dim)


@dataclass
class _Group:
    """The rows whose first affected target is `b0`: each recomputes the S = T - b0 suffix positions."""

    b0: int
    rows: _Rows
    hidden: torch.Tensor  # [R_active, S, D]: rows join at their start layer
    cos: torch.Tensor  # [S, d]: the clean run's rotary tables at positions b0..T-1
    sin: torch.Tensor

    @classmethod
    def build(cls, clean: FastCleanPass, b0: int, indices: list[int], jobs: Sequence[KnockoutJob]) -> _Group:
        """The group of jobs[i] for i in `indices` (-1: a probe row that blocks nothing, from layer 0)."""
        offset = b0 - clean.start
        rows = _Rows.build(indices, jobs, b0, clean)
        return cls(b0, rows, clean.hidden[:1, offset:][:0], clean.cos[offset:], clean.sin[offset:])

    def join(self, layer: int, clean: FastCleanPass) -> None:
        """Add the rows that start at `layer`, with the clean input of that layer."""
        joining = self.rows.starts.count(layer)
        if joining:
            fresh = clean.hidden[layer, self.b0 - clean.start :].expand(joining, -1, -1)
            self.hidden = torch.cat([self.hidden, fresh])


@dataclass(frozen=True)
class _LayerBlocks:
    """What the active rows block in one layer, gathered per chunk of rows (window None: nothing)."""

    window: torch.Tensor | None = None  # [R] bool: the layer is inside the row's window
    pattern: torch.Tensor | None = None  # [R] long: the row's edge set
    rows: _Rows | None = None
    heads: torch.Tensor | None = None  # [R, H] bool: the row blocks in this head (None: every head)

    @property
    def blocks_suffix(self) -> bool:
        return self.window is not None and bool((self.window & self.rows.suffix_any[self.pattern]).any())

    def suffix(self, chunk: slice, n_q: int) -> torch.Tensor:
        """Blocked (query, suffix key) pairs [r, Hm, Sq, S] of the rows in `chunk`, for the last Sq
        queries; Hm = 1 (every head) or H (per-head jobs)."""
        cut = (self.rows.suffix[:, -n_q:][self.pattern[chunk]] & self.window[chunk, None, None])[:, None]
        return cut if self.heads is None else cut & self.heads[chunk, :, None, None]

    def prefix_sets(self, n_q: int) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """(queries [R, Sq] bool, or [R, H, Sq] for per-head jobs; additive prefix mask [P], None if all
        blocked) per restricting edge set."""
        if self.window is None:
            return []
        targets = self.rows.targets[:, -n_q:][self.pattern] & self.window[:, None]  # [R, Sq]
        sets = []
        for u, prefix_mask in enumerate(self.rows.prefix_masks):
            chosen = targets & (self.pattern == u)[:, None]
            if self.heads is not None:
                chosen = chosen[:, None] & self.heads[:, :, None]
            if prefix_mask is not None and chosen.any():
                sets.append((chosen, None if self.rows.prefix_all[u] else prefix_mask))
        return sets


def _edge_set(
    job: KnockoutJob | None, b0: int, clean: FastCleanPass
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One edge set over the suffix b0..T-1: (targets [S] bool, blocked suffix pairs [S, S] bool,
    additive prefix mask [b0] with -inf at sources, or None if no source precedes b0).
    """
    length, device = clean.inputs.length, clean.keys[0].device
    is_source = torch.zeros(length, dtype=torch.bool, device=device)
    is_target = torch.zeros(length - b0, dtype=torch.bool, device=device)
    if job is not None:
        is_source[job.edges.sources.to(device)] = True
        is_target = torch.isin(torch.arange(b0, length, device=device), job.edges.targets.to(device))
    prefix = _additive(is_source[:b0], clean.keys[0].dtype) if is_source[:b0].any() else None
    return is_target, is_target[:, None] & is_source[None, b0:], prefix


@dataclass(frozen=True)
class _Rows:
    """The rows of one sweep over the suffix b0..T-1 (S positions), precomputed once.

    Rows are jobs sorted by start layer (a row joins the batch there); U distinct edge sets are shared.
    """

    jobs: list[int]  # [R] index of each row's job in `run` (-1: the probe row)
    starts: list[int]  # [R] first recomputed layer of each row, non-decreasing
    window: torch.Tensor  # [R, L] bool: the row blocks its edges in this layer
    pattern: torch.Tensor  # [R] long: the row's edge set
    targets: torch.Tensor  # [U, S] bool: the suffix position is a target of the edge set
    suffix: torch.Tensor  # [U, S, S] bool: blocked (target, source) pairs inside the suffix
    suffix_any: torch.Tensor  # [U] bool: the edge set blocks some pair inside the suffix
    prefix_masks: tuple[torch.Tensor | None, ...]  # U x [P] float: -inf at prefix sources (None: none)
    prefix_all: tuple[bool, ...]  # U: every prefix key is a source
    causal: torch.Tensor  # [S, S] float: 0 on and below the diagonal, -inf above
    blocking_layers: list[bool]  # [L]: some row blocks something in this layer
    heads: tuple[tuple[int, ...] | None, ...] = ()  # [R] the row's blocked heads (None: every head)

    @classmethod
    def build(cls, indices: list[int], jobs: Sequence[KnockoutJob], b0: int, clean: FastCleanPass) -> _Rows:
        """Rows for jobs[i], i in `indices` (-1: a probe row from layer 0), sorted by start layer."""
        n_layers = len(clean.keys)
        start = {i: 0 if i < 0 else min(j for j in jobs[i].layers if 0 <= j < n_layers) for i in indices}
        indices = sorted(indices, key=start.__getitem__)
        row_jobs = [None if i < 0 else jobs[i] for i in indices]
        index_of: dict[int, int] = {}  # id(edges) -> edge set
        edge_sets = []
        for job in row_jobs:
            key = -1 if job is None else id(job.edges)
            if key not in index_of:
                index_of[key] = len(edge_sets)
                edge_sets.append(_edge_set(job, b0, clean))
        device = clean.keys[0].device
        window = [[job is not None and j in job.layers for j in range(n_layers)] for job in row_jobs]
        window = torch.tensor(window, dtype=torch.bool, device=device)
        suffix_length = clean.inputs.length - b0
        upper = torch.ones(suffix_length, suffix_length, dtype=torch.bool, device=device).triu(1)
        return cls(
            jobs=indices,
            starts=[start[i] for i in indices],
            window=window,
            pattern=torch.tensor(
                [index_of[-1 if j is None else id(j.edges)] for j in row_jobs], device=device
            ),
            targets=torch.stack([targets for targets, _, _ in edge_sets]),
            suffix=torch.stack([suffix for _, suffix, _ in edge_sets]),
            suffix_any=torch.stack([suffix.any() for _, suffix, _ in edge_sets]),
            prefix_masks=tuple(prefix for _, _, prefix in edge_sets),
            prefix_all=tuple(prefix is not None and bool(prefix.isinf().all()) for _, _, prefix in edge_sets),
            causal=_additive(upper, clean.keys[0].dtype),
            blocking_layers=window.any(0).tolist(),
            heads=tuple(None if job is None else job.heads for job in row_jobs),
        )

    def at_layer(self, layer: int, n_rows: int, n_heads: int) -> _LayerBlocks:
        """What the first `n_rows` rows (the active ones) of `n_heads` query heads block in `layer`."""
        if not self.blocking_layers[layer]:
            return _LayerBlocks()
        heads = None
        if any(h is not None for h in self.heads[:n_rows]):
            heads = torch.ones(n_rows, n_heads, dtype=torch.bool)
            for row, chosen in enumerate(self.heads[:n_rows]):
                if chosen is not None:
                    heads[row] = False
                    heads[row, list(chosen)] = True
            heads = heads.to(self.window.device)
        return _LayerBlocks(self.window[:n_rows, layer], self.pattern[:n_rows], self, heads)


def attend_suffix(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: torch.Tensor,
    blocked: _LayerBlocks,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's queries q [R, H, Sq, d] (the last Sq suffix positions) over its own suffix keys.

    k, v [R, Hkv, S, d]; causal [S, S] additive. Returns (out [R, H, Sq, d], lse [R, H, Sq]). With
    blocked pairs, chunked over rows so each materialised [r, 1, Sq, S] mask stays within MASK_BUDGET.
    """
    n_rows, heads, n_q, _ = q.shape
    length = k.shape[2]
    k, v = _repeat_heads(k, heads), _repeat_heads(v, heads)
    causal = causal[-n_q:]
    if not blocked.blocks_suffix:
        mask = None if n_q == 1 else causal.expand(n_rows, 1, n_q, length)  # the last query sees all
        return attention_lse(q, k, v, mask, scale)
    step = max(1, MASK_BUDGET // (n_q * length))
    pieces = []
    for i in range(0, n_rows, step):
        rows = slice(i, i + step)
        cut = blocked.suffix(rows, n_q)  # [r, Hm, Sq, S]
        mask = causal.masked_fill(cut, float("-inf"))  # [r, Hm, Sq, S]
        empty = (cut | (causal != 0)).all(-1)  # [r, Hm, Sq]: a target blocked from every key it could see
        pieces.append(attention_lse(q[rows], k[rows], v[rows], mask, scale, empty))
    return _cat([out for out, _ in pieces]), _cat([lse for _, lse in pieces])


def attend_prefix(
    q: torch.Tensor,
    k_prefix: torch.Tensor,
    v_prefix: torch.Tensor,
    restricted: list[tuple[torch.Tensor, torch.Tensor]],
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """All rows' queries q [R, H, Sq, d] over the shared clean prefix k, v [Hkv, P, d], not copied per row.

    Rows are folded into the query dimension (per KV head R*G*Sq queries, so no GQA repeat either).
    Queries in `restricted` (bool [R, Sq], additive mask [P] or None: all blocked) are redone with
    their edge set's mask. Returns (out [R, H, Sq, d], lse [R, H, Sq]).
    """
    n_rows, heads, n_q, d = q.shape
    kv_heads = k_prefix.shape[0]
    groups = heads // kv_heads
    folded = q.view(n_rows, kv_heads, groups, n_q, d).transpose(0, 1)  # [Hkv, R, G, Sq, d]
    out, lse = attention_lse(folded.reshape(1, kv_heads, -1, d), k_prefix[None], v_prefix[None], None, scale)
    out, lse = out.view(folded.shape), lse.view(folded.shape[:-1])
    for chosen, prefix_mask in restricted:
        if chosen.dim() == 3:  # per-head jobs: each KV head's queries over its own keys
            per_kv = chosen.view(n_rows, kv_heads, groups, n_q).transpose(0, 1)  # [Hkv, R, G, Sq]
            for h in (h for h in range(kv_heads) if per_kv[h].any()):
                _restrict(out[h], lse[h], folded[h], per_kv[h], k_prefix[h], v_prefix[h], prefix_mask, scale)
            continue
        chosen = chosen[:, None].expand(n_rows, groups, n_q)
        if prefix_mask is None:  # every prefix key is a source
            out[:, chosen], lse[:, chosen] = 0.0, float("-inf")
            continue
        queries = folded[:, chosen][None]  # [1, Hkv, N, d]
        mask = prefix_mask.expand(1, 1, queries.shape[2], -1)
        o, s = attention_lse(queries, k_prefix[None], v_prefix[None], mask, scale)
        out[:, chosen], lse[:, chosen] = o[0], s[0]
    return out.transpose(0, 1).reshape(n_rows, heads, n_q, d), lse.transpose(0, 1).reshape(n_rows, heads, n_q)


def _restrict(out, lse, queries, chosen, k_prefix, v_prefix, prefix_mask, scale) -> None:
    """Redo the `chosen` [R, G, Sq] queries [R, G, Sq, d] of one KV head over its prefix keys [P, d]
    under `prefix_mask` [P] (None: every prefix key blocked), in place in out / lse of that head."""
    if prefix_mask is None:
        out[chosen], lse[chosen] = 0.0, float("-inf")
        return
    picked = queries[chosen][None, None]  # [1, 1, N, d]
    mask = prefix_mask.expand(1, 1, picked.shape[2], -1)
    o, s = attention_lse(picked, k_prefix[None, None], v_prefix[None, None], mask, scale)
    out[chosen], lse[chosen] = o[0, 0], s[0, 0]


# Elements of one materialised [rows, 1, Sq, S] suffix mask: bounds memory when the suffix is long.
MASK_BUDGET = 1 << 22
# Elements of one float32 score chunk when no fused attention kernel applies (non-CPU devices).
SCORE_BUDGET = 1 << 26
FLASH_DTYPES = frozenset({torch.float32, torch.float64, torch.bfloat16, torch.float16})


def attention_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    empty: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T * scale + mask) v and its log-sum-exp (float32).

    q [B, H, N, d], k, v [B, H, M, d] with M > 0, mask [B, 1, N, M] additive or None. Queries flagged
    in `empty` [B, 1 or H, N] (every key masked) get out 0 and lse -inf. Uses torch's fused CPU flash kernel
    where it applies.
    """
    if q.device.type == "cpu" and q.dtype in FLASH_DTYPES:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, attn_mask=mask, scale=scale
        )
    else:
        out, lse = _attention_explicit(q, k, v, mask, scale)
    if empty is not None and empty.any():
        lse = lse.masked_fill(empty, float("-inf"))
        out = out.masked_fill(empty[..., None], 0.0)
    return out, lse.float()


def _attention_explicit(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """`attention_lse` with materialised float32 scores, chunked over queries to stay within SCORE_BUDGET."""
    batch, heads, n_queries, _ = q.shape
    step = max(1, SCORE_BUDGET // (batch * heads * k.shape[2]))
    outs, lses = [], []
    for i in range(0, n_queries, step):
        scores = (q[:, :, i : i + step] @ k.transpose(-1, -2)).float() * scale  # [B, H, n, M]
        if mask is not None:
            scores = scores + mask[:, :, i : i + step]
        lse = scores.logsumexp(-1)
        outs.append((scores - lse[..., None]).exp().nan_to_num_(0.0).to(v.dtype) @ v)
        lses.append(lse)
    return _cat(outs, dim=2), _cat(lses, dim=2)


def _additive(blocked: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Bool -> additive mask: -inf where blocked, 0 elsewhere."""
    return torch.zeros(blocked.shape, dtype=dtype, device=blocked.device).masked_fill_(blocked, float("-inf"))


def _merge(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Attention output over the union of two disjoint key sets, from each one's (out [..., d], lse [...]).

    The share of set `a` is exp(lse_a) / (exp(lse_a) + exp(lse_b)) = sigmoid(lse_a - lse_b).
    """
    (out_a, lse_a), (out_b, lse_b) = a, b
    share = torch.sigmoid(lse_a - lse_b)[..., None]
    return torch.lerp(out_b.float(), out_a.float(), share).to(out_a.dtype)


def _repeat_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[R, Hkv, S, d] -> [R, H, S, d], each KV head repeated for its query group (Llama's repeat_kv)."""
    n_rows, kv_heads, length, d = x.shape
    if kv_heads == heads:
        return x
    return (
        x[:, :, None].expand(n_rows, kv_heads, heads // kv_heads, length, d).reshape(n_rows, heads, length, d)
    )
