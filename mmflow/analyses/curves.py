"""Per-layer curves: the one place a curve's mean, 95% band and minimum are computed.

A curve is a result column averaged over samples at each layer. Its band is Student's t 95% interval
of the mean: mean ± t(0.975, n - 1) · s / sqrt(n), s the sample standard deviation (ddof = 1). With
fewer than two samples there is no band (`ci_low`, `ci_high` and `sem` are NaN): one sample says
nothing about the spread. docs/statistics.md explains the choice.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from scipy import stats as scipy_stats

LEVEL = 0.95


def t_quantile(n: int | np.ndarray | pd.Series, level: float = LEVEL) -> np.ndarray:
    """The two-sided `level` quantile of Student's t with n - 1 degrees of freedom (NaN where n < 2)."""
    dof = np.asarray(n, dtype=float) - 1.0
    with np.errstate(invalid="ignore"):
        return np.where(dof >= 1, scipy_stats.t.ppf(0.5 + level / 2, np.maximum(dof, 1.0)), np.nan)


def half_width(sem: pd.Series, n: pd.Series) -> pd.Series:
    """Half the width of the 95% interval of a mean with standard error `sem` over `n` samples."""
    return sem * t_quantile(n.to_numpy())


def curve_stats(
    results: pd.DataFrame, column: str = "rel_change_pct", scale: float = 1.0, clip: tuple | None = None
) -> pd.DataFrame:
    """Per layer: n, mean, sem, ci_low, ci_high of `column` × `scale` over samples (NaN rows ignored).

    `clip` = (low, high) bounds the band (e.g. 0..100 for probabilities in %), never the mean.
    Columns: layer (int), n, mean, sem, ci_low, ci_high (NaN band where n < 2).
    """
    values = results[column].astype(float) * scale
    stats = values.groupby(results["layer"]).agg(n="count", mean="mean", std="std").reset_index()
    stats = stats.rename(columns={stats.columns[0]: "layer"})
    stats["layer"] = stats["layer"].astype(int)
    stats["n"] = stats["n"].astype(int)
    stats["sem"] = stats["std"] / np.sqrt(stats["n"].clip(lower=1))  # NaN for n < 2
    width = half_width(stats["sem"], stats["n"])
    stats["ci_low"] = stats["mean"] - width
    stats["ci_high"] = stats["mean"] + width
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
