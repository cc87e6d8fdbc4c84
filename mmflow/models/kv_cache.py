"""The key/value cache argument and output field of a transformers model, across versions.

transformers 5.24 renamed the forward argument and output field `past_key_values` to `cache`
(`past_key_values` warns and goes in 5.40); mmflow supports `transformers>=5.20`, so the name is read
from the model's forward signature instead of assumed.
"""

from __future__ import annotations

import inspect
from functools import cache
from typing import Any

import torch


@cache
def _cache_argument(forward_type: type) -> str:
    parameters = inspect.signature(forward_type.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def cache_kwargs(model: torch.nn.Module, cache_value: Any) -> dict[str, Any]:
    """`{name: cache_value}` with the name this model's `forward` takes its key/value cache under."""
    return {_cache_argument(type(model)): cache_value}


def output_cache(output: Any) -> Any:
    """The key/value cache of a model output (`output.cache`, or `output.past_key_values` before 5.24)."""
    if "cache" in output:
        return output["cache"]
    return output.get("past_key_values")
