"""Analyses: what is computed from a sample's clean pass and the engine's jobs, and how it is shown.

Each analysis is a plug-in implementing `mmflow.analyses.base.Analysis`, named in `ANALYSES` (name ->
module, imported lazily) with one config `conf/analysis/<name>.yaml`; `analysis_for(config)` finds it
by the config's `analysis` key.
"""

from mmflow.analyses.base import (
    ANALYSES,
    CAPABILITIES,
    Analysis,
    FigureSpec,
    Labels,
    SamplePlan,
    analysis_class,
    analysis_for,
    canonical_config,
    known_analyses,
    make_analysis,
    register,
)

__all__ = [
    "ANALYSES",
    "CAPABILITIES",
    "Analysis",
    "FigureSpec",
    "Labels",
    "SamplePlan",
    "analysis_class",
    "analysis_for",
    "canonical_config",
    "known_analyses",
    "make_analysis",
    "register",
]
