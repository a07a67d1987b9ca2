"""Checks of a scoring job's input against the model (``outlierd score``): warnings, not errors.

Three signs that the input is not what the model was trained on: input columns that are not model
features (ignored), values far outside the training range (the artifact's ``reference.json``
profile: per-feature ``min`` / ``max``), and an alert rate far from the one the threshold was
calibrated for (the manifest's metrics, or the threshold version's record). Off the per-row path:
one vectorised pass per batch over the feature matrix the batch is scored from.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# a value is "far outside" the training range beyond this many training ranges past min or max
RANGE_MARGIN = 1.0
# a feature is reported when at least this share of its finite values is far outside
FAR_SHARE = 0.01
# the alert rate is reported beyond this factor of the calibrated one, either way ...
ALERT_RATE_FACTOR = 5.0
# ... once the calibrated rate predicts at least this many alerts (fewer: chance alone)
MIN_EXPECTED_ALERTS = 5.0
SHOWN = 5  # features or columns named in one warning
SAMPLE_ROWS = 4096  # rows of a batch checked against the training range at most (a strided sample)


def calibrated_alert_rate(metrics: Mapping[str, Any], threshold_record: Mapping[str, Any] | None = None) -> float | None:
    """The alert rate the threshold in force was set for: a threshold version's target (method
    ``alert_rate``) or its estimated rate; else the training ``alert_rate`` of the manifest's
    metrics. None when unknown (e.g. a precision target without an estimate)."""
    if threshold_record is not None:
        if threshold_record.get("method") == "alert_rate":
            value = threshold_record.get("target")
        else:
            value = threshold_record.get("estimated_alert_rate")
    else:
        value = metrics.get("alert_rate", metrics.get("train_alert_rate"))
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < float(value) < 1.0:
        return None
    return float(value)


def ignored_columns(names: Sequence[str], features: Sequence[str], *passed: str | None) -> list[str]:
    """The input columns that are neither model features nor passed through (id, label)."""
    used = set(features) | {c for c in passed if c is not None}
    return [c for c in names if c not in used]


@dataclass
class InputCheck:
    """Counts, batch by batch, the values of each feature far outside its training range."""

    features: list[str]
    lo: np.ndarray          # (d,) the far bounds: min - margin * range (-inf where unknown)
    hi: np.ndarray          # (d,) max + margin * range (+inf where unknown)
    train_min: np.ndarray   # (d,) for the message
    train_max: np.ndarray
    far: np.ndarray = field(init=False)
    finite: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.far = np.zeros(len(self.features), dtype=np.int64)
        self.finite = np.zeros(len(self.features), dtype=np.int64)

    @classmethod
    def from_reference(cls, reference: Mapping[str, Any] | None, features: Sequence[str],
                       margin: float = RANGE_MARGIN) -> InputCheck:
        """From an artifact's reference profile (features without ``min``/``max`` are never reported)."""
        by_name = {f.get("name"): f for f in (reference or {}).get("features", []) if isinstance(f, dict)}
        d = len(features)
        lo, hi = np.full(d, -np.inf), np.full(d, np.inf)
        tmin, tmax = np.full(d, np.nan), np.full(d, np.nan)
        for j, name in enumerate(features):
            entry = by_name.get(name, {})
            a, b = entry.get("min"), entry.get("max")
            if isinstance(a, (int, float)) and isinstance(b, (int, float)) and np.isfinite(a) and np.isfinite(b):
                span = float(b) - float(a)
                span = span if span > 0 else max(abs(float(b)), 1.0)  # a constant feature: its own size
                lo[j], hi[j] = float(a) - margin * span, float(b) + margin * span
                tmin[j], tmax[j] = a, b
        return cls(list(features), lo, hi, tmin, tmax)

    def observe(self, X: np.ndarray) -> None:
        """Count one batch's ``(n, d)`` feature values (NaN ignored): every row of a batch of up to
        :data:`SAMPLE_ROWS` rows, else an evenly strided sample of about that many (the shares
        reported are 1% and up: a sample sees them, at a bounded cost per batch)."""
        if X.size == 0:
            return
        if X.shape[0] > SAMPLE_ROWS:
            X = X[:: X.shape[0] // SAMPLE_ROWS]
        with np.errstate(invalid="ignore"):
            self.far += np.count_nonzero((X < self.lo) | (X > self.hi), axis=0)
        self.finite += np.count_nonzero(np.isfinite(X), axis=0)

    def far_features(self, share: float = FAR_SHARE) -> list[tuple[str, float, float, float]]:
        """``(name, share far outside, training min, training max)``, largest share first."""
        out = []
        for j in np.flatnonzero((self.far > 0) & (self.far >= share * np.maximum(self.finite, 1))).tolist():
            out.append((self.features[j], float(self.far[j] / max(self.finite[j], 1)), float(self.train_min[j]),
                        float(self.train_max[j])))
        return sorted(out, key=lambda t: -t[1])


def input_warnings(*, ignored: Sequence[str], check: InputCheck | None, rows: int, anomalies: int,
                   expected_rate: float | None) -> list[str]:
    """The warnings of a finished scoring job (one line each)."""
    out: list[str] = []
    if ignored:
        more = f" and {len(ignored) - SHOWN} more" if len(ignored) > SHOWN else ""
        out.append(f"{len(ignored)} input column(s) are not features of the model and were ignored: "
                   f"{', '.join(repr(c) for c in ignored[:SHOWN])}{more} (is this the data the model was trained on?)")
    if check is not None:
        far = check.far_features()
        if far:
            shown = "; ".join(f"{name!r} {100 * s:.1f}% of values (training range [{a:.4g}, {b:.4g}])"
                              for name, s, a, b in far[:SHOWN])
            more = f"; and {len(far) - SHOWN} more" if len(far) > SHOWN else ""
            out.append(f"{len(far)} feature(s) have values far outside their training range (beyond "
                       f"{RANGE_MARGIN:g}x the range past its min or max): {shown}{more}; the scores of those records "
                       "are extrapolations")
    if expected_rate is not None and rows > 0:
        rate = anomalies / rows
        high = rate > ALERT_RATE_FACTOR * expected_rate and anomalies >= MIN_EXPECTED_ALERTS
        low = rate < expected_rate / ALERT_RATE_FACTOR and rows * expected_rate >= MIN_EXPECTED_ALERTS
        if high or low:
            out.append(f"alert rate {100 * rate:.2f}% ({anomalies} of {rows} records) is "
                       + (f"more than {ALERT_RATE_FACTOR:g}x" if high else f"less than 1/{ALERT_RATE_FACTOR:g} of")
                       + f" the rate the threshold was "
                       f"calibrated for ({100 * expected_rate:.2f}%): the input may not be the kind of data the model "
                       "was trained on, or it has drifted (outlierd drift report)")
    return out
