"""Drift and data quality against a model's reference profile (``reference.json``).

The state is a set of histograms on the reference bins: per feature (value bins plus a missing
count), per score bin, and the alert count. Histograms are plain integer counts, so they merge by
addition: windows from several worker processes (or several files) merged give exactly the result
of one process seeing every record. One Numba pass per batch updates the histograms and the
data-quality counters together.

Per window:
  - PSI per feature: ``sum_b (c_b - r_b) * ln(c_b / r_b)`` over the reference bins plus one bin
    for missing values (proportions floored at ``EPS`` so that empty bins stay finite);
  - Wasserstein-1 per feature on the binned data, ``sum_k |C(e_k) - R(e_k)| * (e_{k+1} - e_k)``
    over the inner edges, divided by the span of those edges (comparable across features);
  - KS on scores: the largest gap between the reference and current score CDFs at the reference
    score bin edges;
  - alert rate: flagged / scored, with a two-sided exact binomial test against the calibrated rate.
Drift state per feature: 0 ok, 1 warn, 2 drift, from PSI thresholds (DriftConfig).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numba as nb
import numpy as np

from outlierd.core.errors import InvalidInputError

EPS = 1e-4
QUALITY_REASONS = ("missing", "non_finite", "out_of_range", "constant_break")


@dataclass(frozen=True)
class DriftConfig:
    psi_warn: float = 0.1
    """PSI at or above which a feature is 'warn' (the usual rule of thumb)."""
    psi_drift: float = 0.25
    """PSI at or above which a feature is 'drift'."""
    ks_drift: float = 0.1
    """KS distance on scores at or above which the score distribution has drifted."""
    alert_rate_p: float = 1e-3
    """p-value of the binomial test below which the alert rate has shifted."""
    min_records: int = 1000
    """A window with fewer records is not judged (states stay ok)."""
    range_margin: float = 0.1
    """Values beyond the training range by more than this share of it are 'out_of_range'."""


@dataclass
class Reference:
    """The reference profile as arrays the kernels use."""

    feature_names: list[str]
    edges: np.ndarray          # (d, K-1) float64 inner edges, padded with +inf
    n_bins: np.ndarray         # (d,) int64: real bins per feature
    proportions: np.ndarray    # (d, K) float64, zero-padded
    lo: np.ndarray             # (d,) out-of-range lower bound (-inf when unknown)
    hi: np.ndarray             # (d,) upper bound (+inf when unknown)
    constant: np.ndarray       # (d,) bool: constant in training
    constant_value: np.ndarray  # (d,) float64
    score_edges: np.ndarray    # (S-1,) float64
    score_proportions: np.ndarray  # (S,)
    alert_rate: float | None
    missing_rate: np.ndarray | None = None  # (d,) share of NaN in training

    @classmethod
    def from_profile(cls, profile: dict[str, Any], alert_rate: float | None = None, range_margin: float = 0.1) -> Reference:
        feats = profile.get("features") or []
        if not feats:
            raise InvalidInputError("the model's reference profile is empty: retrain it with training data to monitor drift")
        d = len(feats)
        k = max(len(f["proportions"]) for f in feats)
        edges = np.full((d, max(k - 1, 1)), np.inf)
        props = np.zeros((d, k))
        n_bins = np.zeros(d, dtype=np.int64)
        lo, hi = np.full(d, -np.inf), np.full(d, np.inf)
        const, const_val = np.zeros(d, dtype=bool), np.zeros(d)
        for j, f in enumerate(feats):
            e = np.asarray(f["inner_edges"], dtype=np.float64)
            edges[j, : e.size] = e
            props[j, : len(f["proportions"])] = f["proportions"]
            n_bins[j] = len(f["proportions"])
            if "min" in f:
                span = f["max"] - f["min"]
                lo[j], hi[j] = f["min"] - range_margin * span, f["max"] + range_margin * span
                const[j], const_val[j] = span == 0, f["min"]
        score = profile.get("score") or {}
        return cls([f["name"] for f in feats], edges, n_bins, props, lo, hi, const, const_val,
                   np.asarray(score.get("inner_edges", []), dtype=np.float64),
                   np.asarray(score.get("proportions", [1.0]), dtype=np.float64), alert_rate,
                   np.array([float(f.get("missing_rate", 0.0)) for f in feats]))

    @property
    def n_features(self) -> int:
        return len(self.feature_names)


@dataclass
class Window:
    """Mergeable histograms of one window (or pane)."""

    counts: np.ndarray         # (d, K) int64 value bins
    missing: np.ndarray        # (d,) int64 NaN
    quality: np.ndarray        # (d, 4) int64 by QUALITY_REASONS
    score_counts: np.ndarray   # (S,) int64
    records: int = 0
    alerts: int = 0

    @classmethod
    def empty(cls, ref: Reference) -> Window:
        d, k = ref.proportions.shape
        return cls(np.zeros((d, k), np.int64), np.zeros(d, np.int64), np.zeros((d, len(QUALITY_REASONS)), np.int64),
                   np.zeros(ref.score_proportions.size, np.int64))

    def merge(self, other: Window) -> Window:
        return Window(self.counts + other.counts, self.missing + other.missing, self.quality + other.quality,
                      self.score_counts + other.score_counts, self.records + other.records, self.alerts + other.alerts)

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {"counts": self.counts, "missing": self.missing, "quality": self.quality, "score_counts": self.score_counts,
                "records": np.array(self.records), "alerts": np.array(self.alerts)}

    @classmethod
    def from_arrays(cls, a: dict[str, np.ndarray]) -> Window:
        return cls(a["counts"], a["missing"], a["quality"], a["score_counts"], int(a["records"]), int(a["alerts"]))


OBSERVE_BLOCK = 256


@nb.njit(nogil=True, cache=True)
def _observe(X, scores, threshold, edges, lo, hi, constant, constant_value, score_edges, counts, missing, quality, score_counts):
    """One pass over a batch: value bins, missing, quality reasons, score bins; returns alerts.

    Column by column over blocks of rows, so that the bin count of a block (the number of inner
    edges strictly below each value) is a vectorised loop over rows per edge."""
    n, d = X.shape
    k1 = edges.shape[1]
    col = np.empty(OBSERVE_BLOCK)
    bins = np.empty(OBSERVE_BLOCK, dtype=np.int64)
    for b0 in range(0, n, OBSERVE_BLOCK):
        m = min(OBSERVE_BLOCK, n - b0)
        for j in range(d):
            lo_j, hi_j = lo[j], hi[j]
            bad = 0
            oor = 0
            for i in range(m):  # branch-free: copy the column, count non-finite and out-of-range
                v = np.float64(X[b0 + i, j])
                col[i] = v
                bins[i] = 0
                bad += not (abs(v) < np.inf)
                oor += (v < lo_j) | (v > hi_j)
            if bad:  # rare: tell NaN from inf, and make them missing (NaN: bin 0, skipped below)
                for i in range(m):
                    v = col[i]
                    if not np.isfinite(v):
                        missing[j] += 1
                        if np.isnan(v):
                            quality[j, 0] += 1
                        else:
                            quality[j, 1] += 1
                            oor -= 1  # +/-inf compared as out of range above
                        col[i] = np.nan
            quality[j, 2] += oor
            if constant[j]:
                cv = constant_value[j]
                for i in range(m):
                    quality[j, 3] += (col[i] != cv) & (col[i] == col[i])
            for k in range(k1):
                e = edges[j, k]
                if e == np.inf:  # padding: no more real edges for this feature
                    break
                for i in range(m):
                    bins[i] += col[i] > e
            for i in range(m):
                if col[i] == col[i]:  # not NaN
                    counts[j, bins[i]] += 1
    sbin = np.zeros(n, dtype=np.int64)
    for k in range(score_edges.shape[0]):  # edges outer: a vectorised loop over the scores
        e = score_edges[k]
        for i in range(n):
            sbin[i] += scores[i] > e
    alerts = 0
    for i in range(n):
        score_counts[sbin[i]] += 1
        alerts += scores[i] >= threshold
    return alerts


def observe(window: Window, ref: Reference, X: np.ndarray, scores: np.ndarray, threshold: float) -> None:
    """Add a scored batch (raw records ``X`` as received, and their scores) to ``window``."""
    X = np.ascontiguousarray(X)
    if X.dtype.kind != "f":
        X = X.astype(np.float64)
    scores = np.ascontiguousarray(scores, dtype=np.float64)
    # the kernel does not check bounds: shapes must be right before it runs
    if X.ndim != 2 or X.shape[1] != ref.n_features or scores.shape != (X.shape[0],):
        raise InvalidInputError(f"observe needs X of shape (n, {ref.n_features}) and n scores; got {X.shape} and {scores.shape}")
    window.alerts += int(_observe(X, scores, float(threshold), ref.edges, ref.lo, ref.hi, ref.constant, ref.constant_value,
                                  ref.score_edges, window.counts, window.missing, window.quality, window.score_counts))
    window.records += X.shape[0]


def psi(current: np.ndarray, reference: np.ndarray) -> float:
    """Population stability index of two proportion vectors on the same bins."""
    c = np.maximum(current, EPS)
    r = np.maximum(reference, EPS)
    return float(np.sum((c - r) * np.log(c / r)))


def wasserstein_binned(current: np.ndarray, reference: np.ndarray, inner_edges: np.ndarray) -> float:
    """W1 between two histograms on bins with these inner edges, divided by the edges' span."""
    if inner_edges.size < 2:
        return float(np.abs(current[0] - reference[0])) if current.size else 0.0
    gap = np.abs(np.cumsum(current)[:-1] - np.cumsum(reference)[:-1])  # CDF gap at each inner edge
    widths = np.diff(inner_edges)
    span = inner_edges[-1] - inner_edges[0]
    return float(np.sum(gap[:-1] * widths) / span) if span > 0 else float(gap[:-1].max())


def ks_binned(current: np.ndarray, reference: np.ndarray) -> float:
    """KS distance between two histograms on the same bins (evaluated at the bin edges)."""
    if current.sum() == 0:
        return 0.0
    return float(np.max(np.abs(np.cumsum(current) - np.cumsum(reference))))


def binomial_p(k: int, n: int, p: float) -> float:
    """Two-sided exact binomial test p-value of ``k`` successes in ``n`` trials at rate ``p``."""
    if n == 0 or not 0.0 < p < 1.0:
        return 1.0
    from scipy.stats import binomtest  # scipy comes with scikit-learn

    return float(binomtest(k, n, p).pvalue)


@dataclass
class FeatureDrift:
    name: str
    psi: float
    wasserstein: float
    state: int
    missing_rate: float


@dataclass
class DriftResult:
    records: int
    features: list[FeatureDrift]
    score_ks: float
    score_drift: bool
    alert_rate: float
    expected_alert_rate: float | None
    alert_rate_p: float
    alert_rate_shift: bool
    quality: dict[str, dict[str, int]] = field(default_factory=dict)
    judged: bool = True

    def summary(self) -> dict[str, Any]:
        """The JSON summary: features sorted most-drifted first."""
        feats = sorted(self.features, key=lambda f: (-f.state, -f.psi))
        return {
            "records": self.records,
            "judged": self.judged,
            "features": [{"name": f.name, "psi": f.psi, "wasserstein": f.wasserstein, "state": ("ok", "warn", "drift")[f.state],
                          "missing_rate": f.missing_rate} for f in feats],
            "score_ks": self.score_ks,
            "score_drift": self.score_drift,
            "alert_rate": self.alert_rate,
            "expected_alert_rate": self.expected_alert_rate,
            "alert_rate_p": self.alert_rate_p,
            "alert_rate_shift": self.alert_rate_shift,
            "data_quality": self.quality,
        }


def evaluate(window: Window, ref: Reference, config: DriftConfig = DriftConfig()) -> DriftResult:
    """The drift tests of one window against the reference."""
    judged = window.records >= config.min_records
    feats = []
    ref_missing = ref.missing_rate if ref.missing_rate is not None else np.zeros(ref.n_features)
    for j, name in enumerate(ref.feature_names):
        k = int(ref.n_bins[j])
        seen = window.counts[j, :k].sum()
        cur = window.counts[j, :k] / seen if seen else ref.proportions[j, :k]
        # PSI sees missing values as one more bin, so a feature that goes missing drifts too
        total = seen + window.missing[j]
        cur_m = np.append(window.counts[j, :k], window.missing[j]) / total if total else np.append(ref.proportions[j, :k], 0.0)
        ref_m = np.append(ref.proportions[j, :k] * (1.0 - ref_missing[j]), ref_missing[j])
        p = psi(cur_m, ref_m)
        w = wasserstein_binned(cur, ref.proportions[j, :k], ref.edges[j, : k - 1])
        state = 0
        if judged:
            state = 2 if p >= config.psi_drift else 1 if p >= config.psi_warn else 0
        n = seen + window.missing[j]
        feats.append(FeatureDrift(name, p, w, state, float(window.missing[j] / n) if n else 0.0))
    total = window.score_counts.sum()
    ks = ks_binned(window.score_counts / total, ref.score_proportions) if total else 0.0
    rate = window.alerts / window.records if window.records else 0.0
    p_alert = binomial_p(window.alerts, window.records, ref.alert_rate) if ref.alert_rate else 1.0
    quality = {name: {r: int(window.quality[j, q]) for q, r in enumerate(QUALITY_REASONS) if window.quality[j, q]}
               for j, name in enumerate(ref.feature_names)}
    return DriftResult(window.records, feats, ks, judged and ks >= config.ks_drift, rate, ref.alert_rate, p_alert,
                       judged and p_alert < config.alert_rate_p, {k: v for k, v in quality.items() if v}, judged)


def reference_for(model: Any, config: DriftConfig = DriftConfig()) -> Reference:
    """The :class:`Reference` of a loaded ``core.Model`` (its reference.json and calibrated rate)."""
    rate = model.metrics.get("train_alert_rate", model.metrics.get("alert_rate"))
    return Reference.from_profile(model.reference, rate, config.range_margin)


def psi_noise_floor(n_bins: int, n: int) -> float:
    """Expected PSI of a window of ``n`` records drawn from the reference itself: about (K-1)/n."""
    return (n_bins - 1) / max(n, 1) if n else math.inf
