"""How well an attribution cell's estimates agree with the exact knockouts that verified them.

Per cell, over the verified rows (each sample's top-k estimates by |estimate| plus k random controls):
- `spearman`: rank correlation of estimate and exact, all verified rows of all samples pooled;
- `recall_at_k`: per sample, the share of the k verified rows with the largest |exact| that the
  estimate also put in its top k, averaged over samples;
- `control_fn_rate`: the share of random controls that are false negatives, i.e. that belong to their
  sample's exact top k (|exact| at least the k-th largest |exact| among its verified rows) although the
  estimate left them out of its top k.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import spearmanr

AGREEMENT_KEYS = ("spearman", "recall_at_k", "control_fn_rate", "n_verified", "n_controls")


def agreement(results: pd.DataFrame, k: int) -> dict[str, Any]:
    """The agreement numbers of a cell's rows (columns estimate, exact, verified, top_k, control)."""
    verified = results[results["verified"].astype(bool)]
    if not len(verified):
        return {"n_verified": 0}
    estimate, exact = verified["estimate"].to_numpy(float), verified["exact"].to_numpy(float)
    rho = spearmanr(estimate, exact)[0] if len(verified) > 2 and np.ptp(exact) > 0 else float("nan")
    recalls, false_negatives, controls = [], 0, 0
    for _, rows in verified.groupby("question_id"):
        size = min(k, len(rows))
        magnitude = rows["exact"].abs()
        exact_top = set(magnitude.nlargest(size).index)
        cut = magnitude.nlargest(size).min()
        recalls.append(len(exact_top & set(rows.index[rows["top_k"].astype(bool)])) / size)
        control = rows[rows["control"].astype(bool)]
        controls += len(control)
        false_negatives += int((control["exact"].abs() >= cut).sum())
    return {
        "spearman": float(rho),
        "recall_at_k": float(np.mean(recalls)),
        "control_fn_rate": false_negatives / controls if controls else float("nan"),
        "n_verified": len(verified),
        "n_controls": controls,
    }
