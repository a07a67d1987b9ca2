"""The drift reference profile stored as ``reference.json`` in every artifact.

Per feature: quantile bins of the training values (``inner_edges``: a value ``v`` falls in bin
``k = #(inner_edges < v)``, so the outer bins are open-ended) with their proportions, the missing
rate and summary statistics. For scores: the same binning of the training scores, plus quantiles.
Monitoring compares live windows against these bins (PSI, Wasserstein on bins, KS on scores).
"""

from __future__ import annotations

from typing import Any

import numpy as np

PROFILE_VERSION = 1


def _bins(values: np.ndarray, n_bins: int) -> dict[str, Any]:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return {"inner_edges": [], "proportions": [1.0], "count": 0}
    qs = np.quantile(finite, np.linspace(0, 1, n_bins + 1)[1:-1])
    inner = np.unique(qs)
    k = np.searchsorted(inner, finite, side="left")
    counts = np.bincount(k, minlength=inner.size + 1)
    return {
        "inner_edges": [float(e) for e in inner],
        "proportions": [float(c) for c in counts / counts.sum()],
        "count": int(finite.size),
    }


def build_reference(X: np.ndarray, scores: np.ndarray, feature_names: list[str], n_bins: int = 10, score_bins: int = 20) -> dict[str, Any]:
    """Profile raw training records ``X`` (NaN allowed) and their training ``scores``."""
    X = np.asarray(X, dtype=np.float64)
    features = []
    for j, name in enumerate(feature_names):
        col = X[:, j]
        finite = col[np.isfinite(col)]
        entry = {"name": name, **_bins(col, n_bins), "missing_rate": float(np.mean(~np.isfinite(col))) if col.size else 0.0}
        if finite.size:
            entry.update(min=float(finite.min()), max=float(finite.max()), median=float(np.median(finite)),
                         mean=float(finite.mean()), std=float(finite.std()))
        features.append(entry)
    scores = np.asarray(scores, dtype=np.float64)
    qs = [0.0, 0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99, 0.999, 1.0]
    score = {**_bins(scores, score_bins)}
    if scores.size:
        score["quantiles"] = {str(q): float(v) for q, v in zip(qs, np.quantile(scores, qs))}
    return {"profile_version": PROFILE_VERSION, "rows": int(X.shape[0]), "features": features, "score": score}
