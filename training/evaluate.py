"""Evaluation for imbalanced labels and threshold calibration. Scores: higher = more anomalous."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from outlierd.core.errors import InvalidInputError
from sklearn.metrics import average_precision_score, roc_auc_score


def threshold_for_alert_rate(scores: np.ndarray, alert_rate: float) -> float:
    """The score cut that flags ``ceil(alert_rate * n)`` records (``score >= cut``; ties may add a few)."""
    if not 0.0 < alert_rate < 1.0:
        raise InvalidInputError(f"alert rate must be in (0, 1); got {alert_rate}")
    scores = np.asarray(scores, dtype=np.float64)
    if scores.size == 0:
        raise InvalidInputError("cannot calibrate a threshold on zero scores")
    k = max(1, math.ceil(alert_rate * scores.size))
    return float(np.partition(scores, scores.size - k)[scores.size - k])


def evaluate(scores: np.ndarray, labels: np.ndarray, threshold: float) -> dict[str, Any]:
    """ROC-AUC, PR-AUC (average precision), precision@k for k = number of anomalies, and
    precision / recall of the alerts at ``threshold``."""
    scores = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels).astype(bool)
    n_pos = int(y.sum())
    out: dict[str, Any] = {"rows": int(y.size), "anomalies": n_pos, "anomaly_rate": float(y.mean()) if y.size else 0.0}
    if n_pos == 0 or n_pos == y.size:
        out["note"] = "labels hold one class only: ROC-AUC and PR-AUC are undefined"
    else:
        out["roc_auc"] = float(roc_auc_score(y, scores))
        out["pr_auc"] = float(average_precision_score(y, scores))
        top = np.argsort(-scores, kind="stable")[:n_pos]
        out["precision_at_k"] = float(y[top].mean())
        out["k"] = n_pos
    flagged = scores >= threshold
    out["alerts"] = int(flagged.sum())
    out["precision_at_alert_rate"] = float(y[flagged].mean()) if flagged.any() else 0.0
    out["recall_at_alert_rate"] = float(y[flagged].sum() / n_pos) if n_pos else 0.0
    return out
