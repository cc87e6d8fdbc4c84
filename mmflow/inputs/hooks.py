"""Small composable forward hooks (in the spirit of baukit's nethook): record what layers see."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch


@contextlib.contextmanager
def record_layer_inputs(
    layers: Sequence[torch.nn.Module], start: int | None, last: bool = False
) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Record copies (batch 0) of what each decoder layer receives during one forward.

    `inputs`: with `start`, each layer's input at positions start..T-1 [T - start, D]; `rotary`: with
    `start`, layer 0's (cos, sin) from `start` on [T - start, d]; `last`: with `last`, each layer's
    input at T-1 plus the last layer's output, i.e. the residual stream at the last position from the
    embeddings through the final layer (pre-norm). Copies, not views, so each full [T, D] hidden state
    can be freed as soon as the next layer has run.
    """
    record: dict[str, list[torch.Tensor]] = {"inputs": [], "last": [], "rotary": []}

    def pre_hook(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        if start is not None:
            record["inputs"].append(hidden[0, start:].clone())
            if not record["rotary"] and "position_embeddings" in kwargs:
                record["rotary"] = [table[0, start:].clone() for table in kwargs["position_embeddings"]]
        if last:
            record["last"].append(hidden[0, -1].clone())

    def post_hook(module, args, kwargs, output):
        hidden = output[0] if isinstance(output, tuple) else output
        record["last"].append(hidden[0, -1].clone())

    handles = [layer.register_forward_pre_hook(pre_hook, with_kwargs=True) for layer in layers]
    if last:
        handles.append(layers[-1].register_forward_hook(post_hook, with_kwargs=True))
    try:
        yield record
    finally:
        for handle in handles:
            handle.remove()
