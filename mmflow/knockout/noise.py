"""The numerical noise floor: how far rounding in the model's dtype moves a sample's numbers.

Every number of a cell is a difference between two forwards in the model's dtype, so it carries that
dtype's rounding. Per sample it is measured, never assumed (docs/statistics.md):

- `dithered_logprobs`: the clean forward again, with every decoder layer's output perturbed by up
  to one unit in the last place of its dtype (h * (1 + u), u uniform in ±machine epsilon, seeded).
  How far that moves the clean log-probs is the rounding noise of this model, dtype and sample
  (float32: ~1e-6 in log-probability; bfloat16 at width 4096: ~0.03, docs/statistics.md).
- the fast engine's probe row (nothing blocked, from layer 0) against the clean pass: the empty
  knockout through the fast engine's own order of operations.

A sample's floor (`noise_floor_pct`, in % of p, the unit of a knockout's relative change) is the
largest of the two changes over the answer and the clean top tokens, and never below half a unit in
the last place of the answer's logit (`resolution_pct`); a cell's is the mean over its samples.
The fast engine's probe is judged against `PROBE_FACTOR` times the dithered distance: a real error
of the shortcut is far outside it.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import torch

from mmflow.knockout.attention import blocking

EPSILON = {
    dtype: torch.finfo(dtype).eps for dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16)
}
TOP = 10  # the clean pass's top tokens compared (the probe's tokens)
# The probe may differ from the clean pass by this many times the dithered distance: one rounding per
# layer output; the fast engine rounds at more places (the prefix/suffix attention pieces, batched
# matmuls of other shapes). Measured: docs/statistics.md, "The fast engine's self-check".
PROBE_FACTOR = 8.0
PROBE_FLOOR = 1e-4  # below this (float32 rounding is ~1e-6) every difference passes


def top_distance(logprobs: torch.Tensor, clean: torch.Tensor, top: int = TOP) -> float:
    """Largest |log-prob difference| over the clean pass's `top` tokens."""
    tokens = clean.topk(min(top, clean.shape[-1])).indices
    return float((logprobs[tokens].float() - clean[tokens].float()).abs().max())


def change_pct(logprobs: torch.Tensor, clean: torch.Tensor, token_id: int, top: int = TOP) -> float:
    """The largest |p / p_clean - 1| x 100 over `token_id` and the clean pass's `top` tokens: a change
    of p in a knockout's unit (several tokens, so one token's log-prob rounding to the same float
    does not read as no noise)."""
    distance = max(top_distance(logprobs, clean, top), abs(float(logprobs[token_id] - clean[token_id])))
    return math.expm1(distance) * 100.0


def resolution_pct(clean, token_id: int) -> float:
    """Half a unit in the last place of the answer's logit in its dtype (float32 log-probs without
    logits), in % of p: no difference of p(answer) below it can be told from rounding."""
    if clean.logits is not None:
        value, eps = float(clean.logits[token_id]), torch.finfo(clean.logits.dtype).eps
    else:
        value, eps = float(clean.logprobs[token_id]), torch.finfo(torch.float32).eps
    return math.expm1(eps * max(abs(value), 1.0) / 2.0) * 100.0


@contextlib.contextmanager
def dithering(layers: Sequence[torch.nn.Module], seed: int = 0) -> Iterator[None]:
    """Inside the block every layer's output hidden state h becomes h * (1 + u), u ~ U(-eps, eps) per
    element with eps the machine epsilon of h's dtype (up to one unit in the last place: a smaller
    perturbation would mostly round back to h), from a generator seeded by (`seed`, layer)."""

    def hook(index: int):
        def perturb(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            generator = torch.Generator(device=hidden.device).manual_seed(seed * 1_000_003 + index)
            u = torch.rand(hidden.shape, generator=generator, dtype=torch.float32, device=hidden.device)
            r = EPSILON.get(hidden.dtype, 2.0**-23)
            dithered = (hidden.float() * (1.0 + r * (2.0 * u - 1.0))).to(hidden.dtype)
            return (dithered, *output[1:]) if isinstance(output, tuple) else dithered

        return perturb

    handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def dithered_logprobs(loaded, inputs, seed: int = 0) -> torch.Tensor:
    """Last-position log-softmax (float32) of the clean forward under `dithering`."""
    with dithering(loaded.anatomy.layers, seed), blocking(None):
        out = loaded.model(**inputs.tensors, use_cache=False, logits_to_keep=1)
    return torch.log_softmax(out.logits[0, -1].float(), dim=-1)


def probe_tolerance(rounding: float) -> float:
    """How far the probe may be from the clean pass, given the dithered distance `rounding`."""
    return max(PROBE_FACTOR * rounding, PROBE_FLOOR)
