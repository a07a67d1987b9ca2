"""Preprocessing that every kernel fuses into its pass over a block of records.

Per feature ``j`` a raw value ``v`` becomes ``(v' - center[j]) * scale_inv[j]`` where ``v'`` is:
  - ``v`` when finite;
  - NaN: the training median ``median[j]`` (policy ``impute``), or the row is rejected (``reject``);
  - +/-inf: +/- the largest float32 (policy ``impute``: "very large", which keeps its meaning for
    trees and histograms and never turns into NaN), or the row is rejected (``reject``).

The kernels call :func:`prep_block` on a small row block that stays in L1, then score it: each
record is read from the caller's array exactly once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numba as nb
import numpy as np

from .errors import ArtifactError, InvalidInputError

POLICIES = ("impute", "reject")
FLOAT32_MAX = float(np.finfo(np.float32).max)


@dataclass(frozen=True)
class Preprocessing:
    """Per-feature preprocessing parameters, as stored in an artifact."""

    median: np.ndarray      # (d,) float64, imputation values
    center: np.ndarray      # (d,) float64
    scale_inv: np.ndarray   # (d,) float64, 1 / scale
    missing: str = "impute"  # what to do with NaN / inf: "impute" or "reject"

    @property
    def reject(self) -> bool:
        return self.missing == "reject"

    @classmethod
    def identity(cls, n_features: int, median: np.ndarray | None = None, missing: str = "impute") -> Preprocessing:
        med = np.zeros(n_features) if median is None else np.asarray(median, dtype=np.float64)
        return cls(med, np.zeros(n_features), np.ones(n_features), missing)

    def arrays(self) -> dict[str, np.ndarray]:
        return {"prep_median": self.median, "prep_center": self.center, "prep_scale_inv": self.scale_inv}

    def manifest(self) -> dict[str, Any]:
        scaled = bool(np.any(self.center != 0) or np.any(self.scale_inv != 1))
        return {"missing": self.missing, "scaling": "affine" if scaled else "none"}

    @classmethod
    def from_artifact(cls, manifest: dict[str, Any], arrays: dict[str, np.ndarray], n_features: int) -> Preprocessing:
        missing = manifest.get("missing", "impute")
        if missing not in POLICIES:
            raise ArtifactError(f"unknown missing-value policy {missing!r}; expected one of {POLICIES}")
        try:
            parts = [np.ascontiguousarray(arrays[k], dtype=np.float64) for k in ("prep_median", "prep_center", "prep_scale_inv")]
        except KeyError as e:
            raise ArtifactError(f"arrays.npz lacks preprocessing array {e}") from e
        for p in parts:
            if p.shape != (n_features,) or not np.all(np.isfinite(p)):
                raise ArtifactError(f"preprocessing arrays must be {n_features} finite values each")
        median, center, scale_inv = parts
        return cls(median, center, scale_inv, missing=missing)

    def transform(self, X: np.ndarray) -> np.ndarray:
        """Vectorised NumPy twin of the fused kernel step (float64 out), for training and tests."""
        X = np.array(X, dtype=np.float64)
        nan = np.isnan(X)
        if self.reject and not np.all(np.isfinite(X)):
            raise InvalidInputError("X contains NaN or inf and the missing-value policy is 'reject'")
        X = np.where(nan, self.median[None, :], X)
        X = np.clip(X, -FLOAT32_MAX, FLOAT32_MAX)
        return (X - self.center) * self.scale_inv


@nb.njit(nogil=True, cache=True, inline="always")
def prep_block(X, start, stop, median, center, scale_inv, reject, buf):
    """Fill ``buf[: stop - start]`` with preprocessed rows ``X[start:stop]``.

    Returns the index of the first rejected row, or -1.
    """
    d = X.shape[1]
    for r in range(stop - start):
        for j in range(d):
            v: float = np.float64(X[start + r, j])
            if not np.isfinite(v):
                if reject:
                    return start + r
                if np.isnan(v):
                    v = median[j]
                elif v > 0:
                    v = FLOAT32_MAX
                else:
                    v = -FLOAT32_MAX
            buf[r, j] = (v - center[j]) * scale_inv[j]
    return -1


PREP_BLOCK = 1024  # rows per parallel task of prep_into


@nb.njit(nogil=True, cache=True)
def prep_into_serial(X, median, center, scale_inv, reject, out):
    """``out[:] = `` the preprocessed ``X`` (cast to ``out``'s dtype); returns the first rejected row or -1."""
    return prep_block(X, 0, X.shape[0], median, center, scale_inv, reject, out)


@nb.njit(nogil=True, cache=True, parallel=True)
def prep_into_parallel(X, median, center, scale_inv, reject, out):
    """:func:`prep_into_serial` over row blocks on every core."""
    n = X.shape[0]
    nblocks = (n + PREP_BLOCK - 1) // PREP_BLOCK
    bad = np.full(nblocks, -1, dtype=np.int64)
    for b in nb.prange(nblocks):
        lo = b * PREP_BLOCK
        hi = min(lo + PREP_BLOCK, n)
        bad[b] = prep_block(X, lo, hi, median, center, scale_inv, reject, out[lo:hi])
    for b in range(nblocks):
        if bad[b] >= 0:
            return bad[b]
    return -1
