"""Analyses: what is computed from a sample's clean pass and the engine's knockouts.

Every analysis has `kind`, `result_columns`, `sort_by`, `jobs(groups, sample)` (the knockouts it
needs, possibly none; raises `GroupError` to skip the sample), `rows(sample, clean, token_id,
new_logprobs)` (may raise `GroupError` to skip the sample) and `headline(results)`. Optional:
`prepare(samples)` (called once with the cell's samples before the first one) and
`capture_from(groups)` (the first position whose layer inputs the clean pass must keep).
"""

from __future__ import annotations

from typing import Any

from mmflow.models.registry import LoadedModel

# Config keys an analysis does not read: dropped from its cell config (`mmflow.cli.cell_config`),
# so they neither change its cell id nor claim something in its cell.json.
IGNORED_KEYS: dict[str, tuple[str, ...]] = {
    "knockout": ("lens", "corruption", "patching"),
    "answer_tracking": ("knockout", "window", "corruption", "patching"),
    "patching": ("knockout", "lens"),
}


def drop_ignored_keys(config: dict[str, Any]) -> dict[str, Any]:
    """`config` without the keys its analysis ignores (see `IGNORED_KEYS`)."""
    ignored = IGNORED_KEYS.get(config.get("analysis", "knockout"), ())
    config = {k: v for k, v in config.items() if k not in ignored}
    knockout = config.get("knockout")
    if isinstance(knockout, dict) and knockout.get("heads") is None and "heads" in knockout:
        config["knockout"] = {k: v for k, v in knockout.items() if k != "heads"}  # all heads: as before
    return config


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
            heads=knockout.get("heads"),
            n_heads=int(loaded.model.config.get_text_config().num_attention_heads),
        )
    if kind == "answer_tracking":
        from mmflow.analyses.answer_tracking import AnswerTrackingAnalysis

        labels = {"model": config["model"]["name"], "task": config["task"]}
        return AnswerTrackingAnalysis(loaded, config.get("lens", "norm"), labels)
    if kind == "patching":
        from mmflow.analyses.patching import PatchingAnalysis

        patching = config.get("patching") or {}
        return PatchingAnalysis(
            loaded,
            config["engine"]["name"],
            config.get("corruption", "noise"),
            list(patching.get("groups", ["image", "question", "last"])),
            int(config["window"]),
            {"model": config["model"]["name"], "task": config["task"]},
            noise_scale=float(patching.get("noise_scale", 3.0)),
            margin=float(patching.get("margin", 0.05)),
            seed=int(config.get("seed", 0)),
        )
    raise ValueError(f"unknown analysis {kind!r}; known: knockout, answer_tracking, patching")
