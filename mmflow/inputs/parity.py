"""`parity=paper|corrected`: reproduce the paper's code on the checkpoints it ran, or the clean method.

The mode only exists for models whose config carries `parity: ${parity}` (the four checkpoints the
paper evaluated). Other models (tiny, toy, new families) have no paper code to match: both modes
compute the same thing for them, so the mode is not part of their cell id (`effective_parity`).
The differences are listed in docs/models.md, "Paper parity".
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

PARITY_MODES = ("paper", "corrected")


def check_parity(value: Any, where: str = "parity") -> str | None:
    """`value` if it is a parity mode or None; a ValueError naming `where` otherwise."""
    if value is not None and value not in PARITY_MODES:
        raise ValueError(f"{where} must be one of {PARITY_MODES}, got {value!r}")
    return value


def effective_parity(config: Mapping[str, Any]) -> str | None:
    """The mode a cell is computed in: its model's `parity` (None where the model has no paper code)."""
    check_parity(config.get("parity"), "parity")
    model = config.get("model")
    return check_parity(model.get("parity"), "model.parity") if isinstance(model, Mapping) else None


def paper_pinpoints(pinpoints: list) -> list[list[int]]:
    """The grid pinpoints that make transformers' tile choice walk them as the original LLaVA code does.

    The original `select_best_resolution` reads each pinpoint as (width, height), transformers' as
    (height, width); both keep the first best fit. Transposing every pinpoint gives transformers the
    original's candidates in the original's order, so ties (e.g. 256x256, 320x240) go the same way.
    """
    return [[int(p[1]), int(p[0])] for p in pinpoints]
