"""Robust z-score detector on the CPU (Numba).

Per feature ``j``: ``z_j = (x_j - median_j) / scale_j`` with ``scale_j`` the MAD times 1.4826
(a consistent estimator of the standard deviation under normality; fitted in ``training``).
Combined score, higher = more anomalous:
  - ``rms`` (default): ``sqrt(mean_j z_j**2)``;
  - ``max``: ``max_j |z_j|``.

Explanations (separate kernels, ``explain_serial`` / ``explain_parallel``): feature ``j``
contributes ``|z_j|``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numba as nb
import numpy as np

from .errors import ArtifactError
from .explain import mark_unexplained, select_top_k
from .preprocess import prep_block

BLOCK = 64
COMBINE = ("rms", "max")


@dataclass(frozen=True)
class RobustZ:
    median: np.ndarray     # (d,) float64
    scale_inv: np.ndarray  # (d,) float64, 1 / (1.4826 * MAD), fallback-adjusted
    combine: str = "rms"

    def arrays(self) -> dict[str, np.ndarray]:
        return {"rz_median": self.median, "rz_scale_inv": self.scale_inv}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], n_features: int, combine: str) -> RobustZ:
        if combine not in COMBINE:
            raise ArtifactError(f"unknown robust_z combine {combine!r}; expected one of {COMBINE}")
        try:
            med = np.ascontiguousarray(arrays["rz_median"], dtype=np.float64)
            inv = np.ascontiguousarray(arrays["rz_scale_inv"], dtype=np.float64)
        except KeyError as e:
            raise ArtifactError(f"arrays.npz lacks robust_z array {e}") from e
        if med.shape != (n_features,) or inv.shape != (n_features,):
            raise ArtifactError(f"robust_z arrays must have {n_features} values each")
        if not (np.all(np.isfinite(med)) and np.all(np.isfinite(inv)) and np.all(inv > 0)):
            raise ArtifactError("robust_z medians must be finite and scales positive")
        return cls(med, inv, combine)


@nb.njit(nogil=True, cache=True)
def _score_rows(X, lo, hi, out, median, center, scale_inv, reject, rz_median, rz_scale_inv, use_max, buf):
    d = X.shape[1]
    for b0 in range(lo, hi, BLOCK):
        b1 = min(b0 + BLOCK, hi)
        bad = prep_block(X, b0, b1, median, center, scale_inv, reject, buf)
        if bad >= 0:
            return bad
        for r in range(b1 - b0):
            s = 0.0
            for j in range(d):
                z = (buf[r, j] - rz_median[j]) * rz_scale_inv[j]
                if use_max:
                    s = max(s, abs(z))
                else:
                    s += z * z
            out[b0 + r] = s if use_max else np.sqrt(s / d)
    return -1


@nb.njit(nogil=True, cache=True)
def score_serial(X, out, median, center, scale_inv, reject, rz_median, rz_scale_inv, use_max):
    buf = np.empty((BLOCK, X.shape[1]), dtype=np.float64)
    return _score_rows(X, 0, X.shape[0], out, median, center, scale_inv, reject, rz_median, rz_scale_inv, use_max, buf)


@nb.njit(nogil=True, cache=True, parallel=True)
def score_parallel(X, out, median, center, scale_inv, reject, rz_median, rz_scale_inv, use_max, n_threads):
    n, d = X.shape
    n_blocks = (n + BLOCK - 1) // BLOCK
    n_tasks = max(1, min(n_blocks, n_threads * 4))
    bad = np.full(n_tasks, -1, dtype=np.int64)
    for task in nb.prange(n_tasks):
        buf = np.empty((BLOCK, d), dtype=np.float64)
        lo = (task * n_blocks // n_tasks) * BLOCK
        hi = min(((task + 1) * n_blocks // n_tasks) * BLOCK, n)
        bad[task] = _score_rows(X, lo, hi, out, median, center, scale_inv, reject, rz_median, rz_scale_inv, use_max, buf)
    for task in range(n_tasks):
        if bad[task] >= 0:
            return bad[task]
    return -1


# --------------------------------------------------------------------------- explanations


@nb.njit(nogil=True, cache=True)
def _explain_rows(X, lo, hi, out, feat, contrib, flag_threshold, flagged_only, median, center, scale_inv, reject,
                  rz_median, rz_scale_inv, use_max, buf, c):
    """``_score_rows``' scores (same operations, same order), then ``|z_j|`` of the rows to explain."""
    d = X.shape[1]
    for b0 in range(lo, hi, BLOCK):
        b1 = min(b0 + BLOCK, hi)
        bad = prep_block(X, b0, b1, median, center, scale_inv, reject, buf)
        if bad >= 0:
            return bad
        for r in range(b1 - b0):
            s = 0.0
            for j in range(d):
                z = (buf[r, j] - rz_median[j]) * rz_scale_inv[j]
                if use_max:
                    s = max(s, abs(z))
                else:
                    s += z * z
            s = s if use_max else np.sqrt(s / d)
            out[b0 + r] = s
            if flagged_only and not s >= flag_threshold:
                mark_unexplained(feat[b0 + r], contrib[b0 + r])
                continue
            for j in range(d):
                c[j] = abs((buf[r, j] - rz_median[j]) * rz_scale_inv[j])
            select_top_k(c, feat[b0 + r], contrib[b0 + r])
    return -1


@nb.njit(nogil=True, cache=True)
def explain_serial(X, out, feat, contrib, flag_threshold, flagged_only, median, center, scale_inv, reject,
                   rz_median, rz_scale_inv, use_max):
    d = X.shape[1]
    buf = np.empty((BLOCK, d), dtype=np.float64)
    c = np.empty(d, dtype=np.float64)
    return _explain_rows(X, 0, X.shape[0], out, feat, contrib, flag_threshold, flagged_only, median, center, scale_inv,
                         reject, rz_median, rz_scale_inv, use_max, buf, c)


@nb.njit(nogil=True, cache=True, parallel=True)
def explain_parallel(X, out, feat, contrib, flag_threshold, flagged_only, median, center, scale_inv, reject,
                     rz_median, rz_scale_inv, use_max, n_threads):
    n, d = X.shape
    n_blocks = (n + BLOCK - 1) // BLOCK
    n_tasks = max(1, min(n_blocks, n_threads * 4))
    bad = np.full(n_tasks, -1, dtype=np.int64)
    for task in nb.prange(n_tasks):
        buf = np.empty((BLOCK, d), dtype=np.float64)
        c = np.empty(d, dtype=np.float64)
        lo = (task * n_blocks // n_tasks) * BLOCK
        hi = min(((task + 1) * n_blocks // n_tasks) * BLOCK, n)
        bad[task] = _explain_rows(X, lo, hi, out, feat, contrib, flag_threshold, flagged_only, median, center,
                                  scale_inv, reject, rz_median, rz_scale_inv, use_max, buf, c)
    for task in range(n_tasks):
        if bad[task] >= 0:
            return bad[task]
    return -1
