"""The fast engine: recompute only what a knockout can change, exactly, for all jobs of a sample at once.

Why it is exact (docs/method.md, "Knockout"): blocking edges into targets B changes nothing at positions
before its first target t (causal attention) nor below the window's first layer lo. So the
clean pass (the reference's own forward, no job active) keeps, per layer, the post-rotary keys/values
of the whole sequence and the layer inputs from the earliest planned target on; each job then
recomputes only its suffix rows t..T-1 from layer lo up, with the decoder layer's own submodules and
the clean run's rotary tables (original position ids), attending to the cached clean prefix.

Batching: all jobs of a sample run in one pass over the layers (`mmflow.knockout.rows` plans the rows,
`mmflow.knockout.kernels` holds the attention pieces). A job is a row that joins the batch at its
window's first layer; rows with the same first target form a suffix group. Norms, projections (with
their biases, as in Qwen2) and MLPs run once over all rows' suffix tokens; attention runs per suffix
group in two exact pieces merged by their log-sum-exp: every row's queries over the shared clean
prefix, folded into the query dimension so the prefix is never copied per row, and each row over its
own suffix keys with the causal mask. Blocked (target, source) entries are -inf before the softmax,
all heads, in the row's window layers only; the softmax accumulates in float32.

Rotary positions are never recomputed: the clean run's own cos/sin tables are reused for every
position, whatever their layout (Qwen2.5-VL's multimodal positions: three ids per token, text after the
image resuming after the image's largest position). Decoders: Llama (LLaVA-1.5/1.6, Yi), Mistral,
Qwen2 (OneVision) and Qwen2.5-VL's language model. A sliding window that cuts no key of the sequence
(length <= window) changes nothing and is ignored; one that does sends that sample to the reference.

Where the shortcut is not exact or not supported (other decoders, soft-capped logits) `make_fast_engine`
returns the reference engine, named as a fallback. At run time a probe row per clean pass (the shortest
planned suffix, recomputed from layer 0 with nothing blocked) must reproduce the clean log-probs within
the measured rounding noise of the dtype (`mmflow.knockout.noise`), else that sample falls back to the
reference engine and the engine's name (cell.json, W&B, the cell's terminal line) says so and why.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence

import torch
from transformers.models.llama.modeling_llama import rotate_half

from mmflow.inputs.encode import ModelInputs
from mmflow.inputs.hooks import record_layer_inputs
from mmflow.knockout.attention import IMPLEMENTATIONS, blocking, prepare_model
from mmflow.knockout.clean_pass import CleanPass, FastCleanPass
from mmflow.knockout.kernels import attend_prefix, attend_suffix, cat, merge
from mmflow.knockout.noise import PROBE_FACTOR, PROBE_FLOOR, probe_tolerance, top_distance
from mmflow.knockout.reference import ReferenceEngine, check_no_empty_rows
from mmflow.knockout.rows import SuffixGroup, first_target_of, plan_sweeps
from mmflow.knockout.spec import KnockoutJob
from mmflow.models.anatomy import DECODERS
from mmflow.models.kv_cache import output_cache
from mmflow.models.registry import LoadedModel

log = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = frozenset(DECODERS)
SUPPORTED_LAYERS = frozenset(d.layer_class for d in DECODERS.values())


def unsupported_reason(loaded: LoadedModel) -> str | None:
    """Why the suffix recompute would not be exact for this model, or None if it is."""
    model = loaded.model
    text = model.config.get_text_config()
    if loaded.anatomy.decoder_kind not in SUPPORTED_MODEL_TYPES:
        return f"decoder {loaded.anatomy.decoder_kind!r} is not Llama-style"
    if any(kind not in LAYER_KINDS for kind in getattr(text, "layer_types", None) or ()):
        return "layers without causal (full or sliding-window) attention"
    for name in ("attn_logit_softcapping", "final_logit_softcapping"):
        if getattr(text, name, None) is not None:
            return f"{name} is set"
    kinds = {type(layer).__name__ for layer in loaded.anatomy.layers}
    if not kinds <= SUPPORTED_LAYERS:
        return f"decoder layers {sorted(kinds)} are not Llama-style"
    if text._attn_implementation not in IMPLEMENTATIONS:
        return f"language attention {text._attn_implementation!r} is not mmflow's"
    if model.training:
        return "model is in training mode (dropout)"
    if len({parameter.device for parameter in loaded.anatomy.layers.parameters()}) > 1:
        return "decoder split over several devices (device_map)"
    return None


LAYER_KINDS = frozenset({"full_attention", "sliding_attention"})
# Half-precision attention runs its two pieces (prefix, suffix) and their merge in float32, rounded to
# the model's dtype once, as a fused kernel over all keys does (docs/statistics.md).
ACCUMULATE = {torch.float16: torch.float32, torch.bfloat16: torch.float32}


def sliding_window_in_use(loaded: LoadedModel, length: int) -> int | None:
    """The sliding window that masks some key of a `length`-token sequence, or None if none does.

    A window w lets query q see keys k with q - k < w (transformers' sliding mask), so it cuts
    something only when length > w. Mistral applies `sliding_window` in every layer when it is set;
    Qwen2-style configs only in layers typed "sliding_attention".
    """
    text = loaded.model.config.get_text_config()
    window = getattr(text, "sliding_window", None)
    if text.model_type == "mistral":
        applies = window is not None
    else:  # Llama ignores the field; Qwen2 families use it only in sliding layers
        applies = window is not None and "sliding_attention" in (getattr(text, "layer_types", None) or ())
    return int(window) if applies and length > window else None


def make_fast_engine(loaded: LoadedModel, attention: str) -> ReferenceEngine:
    """The fast engine, or the reference engine named as a fallback when the shortcut is not exact."""
    prepare_model(loaded.model, attention)  # the shortcut is judged on the attention it will run
    reason = unsupported_reason(loaded)
    if reason is None:
        return FastEngine(loaded, attention)
    log.warning("engine=fast falls back to the reference engine: %s", reason)
    engine = ReferenceEngine(loaded, attention)
    engine.name = f"reference (fallback: {reason})"
    return engine


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of x [..., S, d] with tables [S, d] (the Llama formula)."""
    return x * cos + rotate_half(x) * sin


class FastEngine(ReferenceEngine):
    """Suffix-only, window-onward recompute of every knockout of a sample, batched over its rows."""

    def __init__(self, loaded: LoadedModel, attention: str):
        super().__init__(loaded, attention)
        self.layers = loaded.anatomy.layers
        self.norm = loaded.anatomy.final_norm
        self.lm_head = loaded.anatomy.unembedding
        self.fallbacks: Counter[str] = Counter()  # samples (or job sets) that needed the reference engine

    @property
    def name(self) -> str:
        if not self.fallbacks:
            return "fast"
        reasons = "; ".join(f"{reason} x{n}" for reason, n in self.fallbacks.items())
        return f"fast (reference fallback on some samples: {reasons})"

    # ------------------------------------------------------------------ clean pass

    @torch.no_grad()
    def clean(self, inputs: ModelInputs, first_target: int | None = None) -> FastCleanPass:
        """The reference's clean forward (same code, no job), keeping K/V and inputs from `first_target`."""
        if first_target is None:
            base = super().clean(inputs)
            return FastCleanPass(base.inputs, base.logprobs, base.last_hidden, base.cache, base.logits)
        with record_layer_inputs(self.layers, first_target, last=True) as record, blocking(None):
            out = self.loaded.model(**inputs.tensors, use_cache=True, logits_to_keep=1)
        cache = output_cache(out)
        return FastCleanPass(
            inputs,
            torch.log_softmax(out.logits[0, -1].float(), dim=-1),
            torch.stack(record["last"]),
            cache=cache,
            logits=out.logits[0, -1],
            first_target=first_target,
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
        by_first_target: dict[int, list[int]] = {}
        reference: list[int] = []
        sample_reason = self._sample_fallback_reason(clean)
        cached = isinstance(clean, FastCleanPass) and clean.first_target is not None and sample_reason is None
        for index, job in enumerate(jobs):
            first = first_target_of(job, n_layers)
            if first is None:
                continue
            if not cached or first < clean.first_target:
                reference.append(index)
            else:
                by_first_target.setdefault(first, []).append(index)
        if reference:
            reason = sample_reason or "targets before the clean pass's first target"
            log.warning("%d knockouts go to the reference engine: %s", len(reference), reason)
            self.fallbacks[reason] += 1
        for batch in plan_sweeps(by_first_target, length):
            rows = self._sweep(clean, batch, jobs)
            if rows is None:  # the probe failed: the shortcut is not exact for this sample
                reference.extend(i for indices in by_first_target.values() for i in indices)
                break
            out[list(rows)] = torch.stack(list(rows.values()))
        for index in sorted(reference):
            out[index] = self.last_logprobs(clean.inputs, jobs[index])
        return out

    def _sample_fallback_reason(self, clean: CleanPass) -> str | None:
        """Why no job of this sample may take the shortcut (None: it may)."""
        length = clean.inputs.length
        window = sliding_window_in_use(self.loaded, length)
        if window:
            return f"sliding window {window} in use (sequence of {length} tokens)"
        if isinstance(clean, FastCleanPass) and clean.first_target is not None:
            expected = (length - clean.first_target, self.layers[0].self_attn.head_dim)
            if clean.cos is None or tuple(clean.cos.shape) != expected:
                shape = None if clean.cos is None else tuple(clean.cos.shape)
                return f"rotary tables {shape} are not one [T, head_dim] row per position"
        return None

    @torch.no_grad()
    def _sweep(
        self, clean: FastCleanPass, by_first_target: dict[int, list[int]], jobs: Sequence[KnockoutJob]
    ) -> dict[int, torch.Tensor] | None:
        """{job index: log-probs [V]} for the jobs in `by_first_target` ({first target: job indices}), in
        one pass over the layers.

        None if the probe row fails: added once per clean pass, from layer 0, to the suffix group with the
        shortest suffix (the cheapest; it still runs every layer's prefix attention and MLP).
        """
        probe = not clean.probed
        suffix_groups = []
        for first in sorted(by_first_target):
            indices = by_first_target[first] + ([-1] if probe and first == max(by_first_target) else [])
            suffix_groups.append(SuffixGroup.build(clean, first, indices, jobs))
        self._forward(clean, suffix_groups)
        top = torch.cat([g.hidden[:, -1] for g in suffix_groups])  # [R, D]
        logprobs = torch.log_softmax(self.lm_head(self.norm(top)).float(), dim=-1)
        order = [index for g in suffix_groups for index in g.rows.jobs]
        result = {index: row for index, row in zip(order, logprobs, strict=True) if index >= 0}
        if probe and not self._probe_ok(clean, logprobs[order.index(-1)]):
            return None
        clean.probed = True
        return result

    def _probe_ok(self, clean: CleanPass, logprobs: torch.Tensor) -> bool:
        """Whether the no-knockout row reproduced the clean log-probs of the clean pass's top tokens
        within the measured rounding noise of the dtype (`noise.probe_tolerance`)."""
        clean.probe = logprobs
        diff = top_distance(logprobs, clean.logprobs)
        if diff <= PROBE_FLOOR:
            return True
        rounding = top_distance(self.dithered(clean), clean.logprobs)
        tolerance = probe_tolerance(rounding)
        if diff <= tolerance:
            return True
        reason = (
            f"probe differs from the clean pass by {diff:.3g} in log-probability, over "
            f"{PROBE_FACTOR:g}x the {self.loaded.model.dtype} rounding noise {rounding:.3g} (noise.py)"
        )
        log.warning("fast engine %s; using the reference engine for this sample", reason)
        dtype = str(self.loaded.model.dtype).removeprefix("torch.")
        self.fallbacks[f"probe mismatch beyond {PROBE_FACTOR:g}x the {dtype} rounding noise"] += 1
        return False

    def _forward(self, clean: FastCleanPass, suffix_groups: list[SuffixGroup]) -> None:
        """Run every suffix group's rows from their start layers to the top (each one's hidden ->
        [R, 1, D])."""
        for index in range(
            min(suffix_group.rows.starts[0] for suffix_group in suffix_groups), len(self.layers)
        ):
            for suffix_group in suffix_groups:
                suffix_group.join(index, clean)
            self._layer(index, [g for g in suffix_groups if g.hidden.shape[0]], clean)

    def _layer(self, index: int, suffix_groups: list[SuffixGroup], clean: FastCleanPass) -> None:
        """Decoder layer `index` on the active rows of every suffix group, token-wise parts batched together.

        Norms, projections and the MLP run once over all suffix tokens [N, D]; attention runs per suffix group
        (each has its own prefix length). At the top layer only each row's last position is kept.
        """
        layer = self.layers[index]
        attn = layer.self_attn
        sizes = [g.hidden.shape[0] * g.hidden.shape[1] for g in suffix_groups]
        x = layer.input_layernorm(cat([g.hidden.flatten(0, 1) for g in suffix_groups]))  # [N, D]
        keys, values = attn.k_proj(x).split(sizes), attn.v_proj(x).split(sizes)
        outs, residual = [], []
        for suffix_group, xg, kg, vg in zip(suffix_groups, x.split(sizes), keys, values, strict=True):
            out = self._attend(index, suffix_group, xg, kg, vg, clean)  # [R, Sq, H*d]
            outs.append(out.flatten(0, 1))
            residual.append(suffix_group.hidden[:, -out.shape[1] :].flatten(0, 1))
        hidden = cat(residual) + attn.o_proj(cat(outs))
        hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        for suffix_group, h in zip(suffix_groups, hidden.split([len(o) for o in outs]), strict=True):
            suffix_group.hidden = h.view(suffix_group.hidden.shape[0], -1, h.shape[-1])

    def _attend(
        self,
        index: int,
        suffix_group: SuffixGroup,
        x: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        clean: FastCleanPass,
    ) -> torch.Tensor:
        """Self-attention output [R, Sq, H*d] of one suffix group's rows, from their normed inputs x [R*S, D]
        and projected keys/values k, v [R*S, Hkv*d]. Sq = S, or 1 at the top layer.
        """
        attn = self.layers[index].self_attn
        d = attn.head_dim
        n_rows, length = suffix_group.hidden.shape[:2]
        n_q = 1 if index == len(self.layers) - 1 else length
        q = attn.q_proj(x.view(n_rows, length, -1)[:, -n_q:]).view(n_rows, n_q, -1, d).transpose(1, 2)
        k = k.view(n_rows, length, -1, d).transpose(1, 2)  # [R, Hkv, S, d]
        v = v.view(n_rows, length, -1, d).transpose(1, 2)
        q, k = (
            _rotate(q, suffix_group.cos[-n_q:], suffix_group.sin[-n_q:]),
            _rotate(k, suffix_group.cos, suffix_group.sin),
        )  # [R, H, Sq, d]
        dtype = q.dtype
        wide = ACCUMULATE.get(dtype, dtype)  # half precision: both pieces and their merge in float32
        q, k, v = q.to(wide), k.to(wide), v.to(wide)
        blocked = suffix_group.rows.at_layer(index, n_rows, q.shape[1])
        out, lse = attend_suffix(q, k, v, suffix_group.rows.causal.to(wide), blocked, attn.scaling)
        if suffix_group.first_target:  # the clean prefix [Hkv, t, d], shared by every row
            prefix = (
                clean.keys[index][:, : suffix_group.first_target].to(wide),
                clean.values[index][:, : suffix_group.first_target].to(wide),
            )
            sets = [(c, None if m is None else m.to(wide)) for c, m in blocked.prefix_sets(n_q)]
            out = merge((out, lse), attend_prefix(q, *prefix, sets, attn.scaling))
        return out.to(dtype).transpose(1, 2).reshape(n_rows, n_q, -1)
