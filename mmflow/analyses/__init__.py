"""Analyses: what is computed from a sample's clean pass and the engine's knockouts.

Every analysis has `kind`, `result_columns`, `sort_by`, `jobs(groups)` (the knockouts it needs,
possibly none), `rows(sample, clean, token_id, new_logprobs)` and `headline(results)`.
"""

from __future__ import annotations

from typing import Any

from mmflow.models.registry import LoadedModel


def make_analysis(config: dict[str, Any], loaded: LoadedModel):
    """The analysis named by the cell config's `analysis` key."""
    kind = config.get("analysis", "knockout")
    if kind == "knockout":
        from mmflow.analyses.knockout import KnockoutAnalysis
        from mmflow.knockout.spec import KnockoutSpec

        knockout = config["knockout"]
        return KnockoutAnalysis(
            KnockoutSpec(knockout["name"], knockout["source"], knockout["target"]),
            int(config["window"]),
            loaded.n_layers,
            labels={
                "model": config["model"]["name"],
                "task": config["task"],
                "knockout": knockout["name"],
                "window": int(config["window"]),
            },
        )
    raise ValueError(f"unknown analysis {kind!r}; known: knockout")
