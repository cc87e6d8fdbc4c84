"""The clean pass of one sample: what every analysis of the sample shares (`CleanPass`), and what the
fast engine restarts its knockouts from (`FastCleanPass`: per-layer keys, values and layer inputs)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from mmflow.inputs.encode import ModelInputs


@dataclass
class CleanPass:
    """The clean run of one sample, shared by every analysis of that sample.

    `logprobs` [V]: last-position log-softmax (float32). `last_hidden` [L+1, D]: the residual stream
    at the last position from the embeddings through the final layer, before the final norm.
    `cache`: the forward's key/value cache (a transformers Cache) and `logits` [V] its raw last-position
    logits, kept for the greedy answer (`mmflow.execution.answer`), which releases the cache;
    None if not kept.
    `dithered`, `probe`: what the sample's numerical noise floor is measured from (`noise_floor_pct`).
    """

    inputs: ModelInputs
    logprobs: torch.Tensor
    last_hidden: torch.Tensor
    cache: Any = None
    logits: torch.Tensor | None = None
    dithered: torch.Tensor | None = None  # [V] the clean forward under one rounding per layer (noise.py)
    probe: torch.Tensor | None = None  # [V] the fast engine's empty knockout (probe row), if it ran

    @property
    def top1(self) -> int:
        return int(self.logprobs.argmax())


@dataclass
class FastCleanPass(CleanPass):
    """The clean pass plus the caches the fast engine restarts from.

    `keys`/`values`: per layer [Hkv, T, d], after rotary. `hidden` [L, T - t, D]: the input of
    every layer at positions t..T-1, t = `first_target` (the earliest first target of the jobs it
    serves). `cos`/`sin` [T - t, d]: the clean run's rotary tables at
    the same positions. Left empty when no knockout was planned (`first_target` None).
    """

    first_target: int | None = None
    keys: list[torch.Tensor] = field(default_factory=list)
    values: list[torch.Tensor] = field(default_factory=list)
    hidden: torch.Tensor | None = None
    cos: torch.Tensor | None = None
    sin: torch.Tensor | None = None
    probed: bool = False  # the probe row already reproduced this clean pass
