"""Small composable forward hooks (in the spirit of baukit's nethook): record what layers see."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch


@contextlib.contextmanager
def record_layer_inputs(
    layers: Sequence[torch.nn.Module], start: int | None, last: bool = False
) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Record each layer's input hidden states (batch 0) and, with `last`, the final layer's output.

    `start` keeps positions start..T-1 of every layer input in `record["inputs"]` (None: keep none);
    `last` keeps the last position of every layer input plus the last layer's output in
    `record["last"]`, i.e. the residual stream from the embeddings through the final layer (pre-norm).
    """
    record: dict[str, list[torch.Tensor]] = {"inputs": [], "last": []}

    def pre_hook(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        if start is not None:
            record["inputs"].append(hidden[0, start:].detach())
        if last:
            record["last"].append(hidden[0, -1].detach())

    def post_hook(module, args, kwargs, output):
        hidden = output[0] if isinstance(output, tuple) else output
        record["last"].append(hidden[0, -1].detach())

    handles = [layer.register_forward_pre_hook(pre_hook, with_kwargs=True) for layer in layers]
    if last:
        handles.append(layers[-1].register_forward_hook(post_hook, with_kwargs=True))
    try:
        yield record
    finally:
        for handle in handles:
            handle.remove()
