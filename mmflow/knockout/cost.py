"""What an exact knockout must recompute, in multiply-accumulates (MACs) of the decoder.

A job that blocks edges into targets from layer `lo` on changes nothing below `lo` nor before its
first target (the first position it can change, docs/method.md "Knockout"); anything from there to T-1,
from `lo` up, may change. So no exact method (the fast engine included) can recompute less than
those positions in those layers. At the top layer only the last position's query, attention and MLP
feed the answer, but every suffix position's key and value is still needed.

`floor_over_clean` is that work over the clean pass's: the least any exact knockout engine can
spend, in clean passes of the decoder. It counts the decoder only (no vision tower, no unembedding,
no framework overhead), while a measured clean forward includes them, so a measured ratio over a
clean forward can sit below the floor by the share those take (small on real checkpoints, where the
decoder dominates; not small at the benchmark's CPU widths with thousands of image tokens).

MACs per token and layer (Llama-style decoder, hidden D, heads H, KV heads Hkv, head dim d, MLP
width I): projections D*H*d (q) + 2*D*Hkv*d (k, v) + H*d*D (o), MLP 3*D*I (gate, up, down), and
attention over the p + 1 keys a query at position p sees, 2*H*d*(p + 1) (scores, weighted values).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from mmflow.knockout.rows import first_target_of
from mmflow.knockout.spec import KnockoutJob


@dataclass(frozen=True)
class DecoderShape:
    """The sizes of a Llama-style decoder that set its MACs per token and layer."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int

    @classmethod
    def of(cls, text_config) -> DecoderShape:
        """From a transformers text config (`model.config.get_text_config()`)."""
        heads = text_config.num_attention_heads
        head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // heads
        return cls(
            layers=text_config.num_hidden_layers,
            hidden=text_config.hidden_size,
            heads=heads,
            kv_heads=getattr(text_config, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            intermediate=text_config.intermediate_size,
        )

    @property
    def kv_macs(self) -> int:
        """Key and value projections of one token in one layer."""
        return 2 * self.hidden * self.kv_heads * self.head_dim

    @property
    def token_macs(self) -> int:
        """Every position-independent MAC of one token in one layer (projections and MLP)."""
        attention_projections = 2 * self.hidden * self.heads * self.head_dim + self.kv_macs
        return attention_projections + 3 * self.hidden * self.intermediate

    def attention_macs(self, first: int, end: int) -> int:
        """Scores and weighted values of the queries at positions first..end-1 (causal: p + 1 keys)."""
        keys = (end * (end + 1) - first * (first + 1)) // 2
        return 2 * self.heads * self.head_dim * keys


def clean_macs(shape: DecoderShape, length: int) -> int:
    """The decoder MACs of one clean forward of `length` tokens."""
    return shape.layers * (length * shape.token_macs + shape.attention_macs(0, length))


def job_macs(shape: DecoderShape, length: int, first_target: int | None, first_layer: int) -> int:
    """The MACs no exact method can skip for a job with this first target, from `first_layer` on."""
    if first_target is None or first_layer >= shape.layers:
        return 0
    suffix = length - first_target
    full_layers = shape.layers - 1 - first_layer  # every layer but the top one, in full
    per_layer = suffix * shape.token_macs + shape.attention_macs(first_target, length)
    top = (
        suffix * shape.kv_macs + (shape.token_macs - shape.kv_macs) + shape.attention_macs(length - 1, length)
    )
    return full_layers * per_layer + top


def floor_over_clean(shape: DecoderShape, samples: Iterable[tuple[int, Sequence[KnockoutJob]]]) -> float:
    """Σ over samples of the unavoidable MACs of every job / Σ of their clean forwards' MACs.

    `samples`: (sequence length T, the sample's jobs) pairs. A job's first layer is the lowest layer it
    blocks in; a job that blocks nothing the causal mask allows costs nothing.
    """
    needed = clean = 0
    for length, jobs in samples:
        clean += clean_macs(shape, length)
        for job in jobs:
            layers = [layer for layer in job.layers if 0 <= layer < shape.layers]
            first_target = first_target_of(job, shape.layers)
            needed += job_macs(shape, length, first_target, min(layers)) if layers else 0
    return needed / clean if clean else 0.0
