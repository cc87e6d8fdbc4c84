"""Per-layer curves: the one place a curve's mean, 95% band and minimum are computed.

A curve is a result column averaged over samples at each layer. Its band is the normal 95% interval
of the mean (mean ± 1.96 standard errors, sample standard deviation with ddof=1); with one sample
or no spread the band collapses onto the mean.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

Z95 = 1.96


def curve_stats(
    results: pd.DataFrame, column: str = "rel_change_pct", scale: float = 1.0, clip: tuple | None = None
) -> pd.DataFrame:
    """Per layer: n, mean, sem, ci_low, ci_high of `column` × `scale` over samples (NaN rows ignored).

    `clip` = (low, high) bounds the band (e.g. 0..100 for probabilities in %), never the mean.
    Columns: layer (int), n, mean, sem, ci_low, ci_high.
    """
    values = results[column].astype(float) * scale
    stats = values.groupby(results["layer"]).agg(n="count", mean="mean", std="std").reset_index()
    stats = stats.rename(columns={stats.columns[0]: "layer"})
    stats["layer"] = stats["layer"].astype(int)
    stats["n"] = stats["n"].astype(int)
    stats["sem"] = stats["std"].fillna(0.0) / np.sqrt(stats["n"].clip(lower=1))
    stats["ci_low"] = stats["mean"] - Z95 * stats["sem"]
    stats["ci_high"] = stats["mean"] + Z95 * stats["sem"]
    if clip is not None:
        stats["ci_low"] = stats["ci_low"].clip(lower=clip[0])
        stats["ci_high"] = stats["ci_high"].clip(upper=clip[1])
    return stats.drop(columns="std")


def curve_minimum(table: pd.DataFrame, value: str) -> dict[str, Any]:
    """The minimum of curve `value` of a curve table and its layer: {min_<value>, min_layer}."""
    curve = table[table["value"] == value].set_index("layer")["mean"]
    if not len(curve):
        return {}
    return {f"min_{value}": float(curve.min()), "min_layer": int(curve.idxmin())}
