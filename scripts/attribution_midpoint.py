"""Where the attribution screen takes its gradient, and how that changes its ranking (docs/attribution.md).

    PYTHONPATH=. python scripts/attribution_midpoint.py --samples 24 --knockout image_to_question

toy-llava (its trained weights), ChooseAttr shapes, every layer x head with window 1. Each variant
estimates Δ log p of blocking the edges in one head as g · ΔO, where ΔO is the screen's exact change of
the head's output (QK correction, `mmflow.knockout.attribution`) and g the gradient of log p at the
head's output, evaluated at:
- `clean`: the clean run (the screen; one backward per sample);
- `layer_midpoint`: the clean run plus half of every head's ΔO of that layer (one backward per layer);
- `all_layers_average`: the mean of the clean gradient and the one with half of every head's ΔO added
  in every layer at once (one extra backward per sample);
- `head_midpoint`: the clean run plus half of that head's own ΔO (one backward per head);
- `head_trapezoid`, `head_simpson`: the mean of the clean gradient and the one with that head's whole
  ΔO added (Simpson: with the midpoint too); one or two backwards per head.
Prints Spearman vs the exact knockouts (fast engine): mean per sample and pooled, one line per variant.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile

import numpy as np
import torch
from scipy.stats import spearmanr

from mmflow.bench.attribution import TOY_TASK, toy_loaded
from mmflow.data import load_shapes
from mmflow.data.sample import Sample
from mmflow.inputs.encode import encode
from mmflow.inputs.groups import build_token_groups
from mmflow.knockout.attribution import Gradients, _attention, answer_gradients
from mmflow.knockout.fast import make_fast_engine
from mmflow.knockout.spec import NAMED_KNOCKOUTS, BlockEdges, KnockoutJob

VARIANTS = (
    "clean",
    "layer_midpoint",
    "all_layers_average",
    "head_midpoint",
    "head_trapezoid",
    "head_simpson",
)


def head_deltas(gradients: Gradients, layer: int, sources, targets) -> torch.Tensor:
    """ΔO [H, Tt, d] of blocking `sources -> targets` in each head of `layer` alone (clean q, k)."""
    logits, value = _attention(gradients.layers[layer], targets)
    clean = torch.softmax(logits, dim=-1)
    logits[..., sources] = float("-inf")
    return (torch.softmax(logits, dim=-1).nan_to_num(0.0) - clean) @ value


@contextlib.contextmanager
def added(loaded, targets, additions: dict[int, torch.Tensor]):
    """Add [H, Tt, d] to each listed layer's head outputs (the input of o_proj) at the target rows."""

    def hook_for(delta):
        flat = delta.transpose(0, 1).flatten(1)

        def hook(module, args):
            x = args[0].clone()
            x[0, targets] = x[0, targets] + flat.to(x.dtype)
            return (x,)

        return hook

    layers = loaded.anatomy.layers
    handles = [
        layers[i].self_attn.o_proj.register_forward_pre_hook(hook_for(d)) for i, d in additions.items()
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def estimates(loaded, inputs, token, edges) -> dict[str, torch.Tensor]:
    """Every variant's estimates [L, H] for one sample (whole-sequence gradient runs)."""
    sources, targets = edges.sources, edges.targets
    clean = answer_gradients(loaded, inputs, token)
    layers, heads = loaded.n_layers, clean.layers[0].query.shape[0]
    deltas = [head_deltas(clean, layer, sources, targets) for layer in range(layers)]

    def grad_at(additions: dict[int, torch.Tensor], layer: int) -> torch.Tensor:
        with added(loaded, targets, additions):
            return answer_gradients(loaded, inputs, token).layers[layer].grad[:, targets]

    with added(loaded, targets, {i: d / 2 for i, d in enumerate(deltas)}):
        everywhere = answer_gradients(loaded, inputs, token)
    out = {name: torch.zeros(layers, heads) for name in VARIANTS}
    for layer, delta in enumerate(deltas):
        g0 = clean.layers[layer].grad[:, targets]
        out["clean"][layer] = (g0 * delta).sum((1, 2))
        out["layer_midpoint"][layer] = (grad_at({layer: delta / 2}, layer) * delta).sum((1, 2))
        g_all = (g0 + everywhere.layers[layer].grad[:, targets]) / 2
        out["all_layers_average"][layer] = (g_all * delta).sum((1, 2))
        for head in range(heads):
            one = torch.zeros_like(delta)
            one[head] = delta[head]
            g_mid, g_end = grad_at({layer: one / 2}, layer)[head], grad_at({layer: one}, layer)[head]
            out["head_midpoint"][layer, head] = (g_mid * delta[head]).sum()
            out["head_trapezoid"][layer, head] = ((g0[head] + g_end) / 2 * delta[head]).sum()
            out["head_simpson"][layer, head] = ((g0[head] + 4 * g_mid + g_end) / 6 * delta[head]).sum()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=24)
    parser.add_argument("--knockout", default="image_to_question", choices=sorted(NAMED_KNOCKOUTS))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    loaded = toy_loaded()
    engine = make_fast_engine(loaded, "sdpa")
    layers, heads = loaded.n_layers, loaded.model.config.get_text_config().num_attention_heads
    source, target = NAMED_KNOCKOUTS[args.knockout]
    rhos: dict[str, list[float]] = {name: [] for name in VARIANTS}
    pooled: dict[str, tuple[list, list]] = {name: ([], []) for name in VARIANTS}
    with tempfile.TemporaryDirectory() as folder:
        shapes = load_shapes(TOY_TASK, args.samples, seed=0, cache_dir=folder)
        for sample in [s for s in shapes if isinstance(s, Sample)]:
            inputs = encode(loaded, sample)
            groups = build_token_groups(loaded, inputs, sample)
            edges = BlockEdges(groups.require(source), groups.require(target))
            clean = engine.clean(inputs, first_target=edges.first_target)
            token = clean.top1
            jobs = [KnockoutJob(edges, range(i, i + 1), (h,)) for i in range(layers) for h in range(heads)]
            exact = (engine.run(clean, jobs)[:, token] - clean.logprobs[token]).numpy()
            for name, estimate in estimates(loaded, inputs, token, edges).items():
                rhos[name].append(float(spearmanr(estimate.flatten(), exact)[0]))
                pooled[name][0].extend(estimate.flatten().tolist())
                pooled[name][1].extend(exact.tolist())
    for name in VARIANTS:
        mean, whole = float(np.nanmean(rhos[name])), float(spearmanr(*pooled[name])[0])
        print(
            f"{name:20s} Spearman mean per sample {mean:.3f}  pooled {whole:.3f}  ({len(rhos[name])} samples)"
        )


if __name__ == "__main__":
    main()
