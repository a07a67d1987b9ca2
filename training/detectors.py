"""Detector fitting. Each returns what ``export.export_detector`` writes: the detector's manifest
entry and its arrays. Inputs are preprocessed (imputed) float64 records."""

from __future__ import annotations

from typing import Any

import numpy as np

from outlierd.core.errors import DataError, InvalidInputError

DETECTORS = ("iforest", "robust_z", "hbos", "knn", "lof", "autoencoder")
MAD_TO_SIGMA = 1.4826
MEANAD_TO_SIGMA = 1.2533
DEFAULT_K = 20  # knn / lof neighbours (fit_knn, fit_lof)

# The fewest training rows each detector is fitted on (the rows of the fit: known anomalies left
# out). Below these the model is not what its name says, and the threshold (a quantile of the
# training scores at the alert rate) is set on a handful of values:
# - iforest: trees of max_samples = min(256, n) rows have depth ceil(log2 n); 32 rows give depth-5
#   trees (path lengths 0-5 + c(size)), a usable score spread; fewer and most records tie.
# - hbos: default_bins(n) is at least 10 equal-width bins per feature; 32 rows put ~3 rows in a
#   bin on average: fewer and most bins are empty and every density is noise.
# - robust_z: a median and a MAD per feature; 16 rows keep their sampling error below ~0.4 sigma.
# - knn / lof: k = 20 neighbours must exist besides the record itself (lof caps k at n - 1, knn
#   at n; both silently become another detector below k + 1 rows).
# - autoencoder: 10% of the rows are held out for early stopping, in batches of 128: 100 rows
#   give 10 validation rows.
# - stacked: fits iforest, robust_z, hbos and knn on the same rows: the largest of theirs.
MIN_FIT_ROWS: dict[str, int] = {"iforest": 32, "hbos": 32, "robust_z": 16, "knn": DEFAULT_K + 1,
                                "lof": DEFAULT_K + 1, "autoencoder": 100, "stacked": 32, "hst": 1, "rshash": 1}
# Detectors that learn while they score (core.streaming): training learns the rows in order.
STREAMING_DETECTORS = ("hst", "rshash")


def min_fit_rows(detector: str) -> int:
    """The fewest rows ``detector`` (a detector, or a ``--select`` candidate such as
    ``iforest_1024``) is fitted on; see :data:`MIN_FIT_ROWS`."""
    if detector in MIN_FIT_ROWS:
        return MIN_FIT_ROWS[detector]
    base = detector.split("_")[0]
    return MIN_FIT_ROWS.get(base, max(MIN_FIT_ROWS.values()))


def check_fit_rows(detector: str, rows: int, where: object, what: str = "rows") -> None:
    """Refuse (:class:`DataError`) to fit ``detector`` on fewer rows than :func:`min_fit_rows`."""
    need = min_fit_rows(detector)
    if rows < need:
        raise DataError(f"{where}: {rows} {what} to fit {detector} on; {detector} needs at least {need}: "
                        "train on more data (or choose a detector that needs fewer rows, e.g. robust_z needs "
                        f"{MIN_FIT_ROWS['robust_z']})")


def fit_iforest(X: np.ndarray, *, seed: int = 0, n_estimators: int = 100, max_samples: int = 256) -> Any:
    """A scikit-learn IsolationForest (100 trees of 256 samples by default)."""
    from sklearn.ensemble import IsolationForest

    forest = IsolationForest(n_estimators=n_estimators, max_samples=min(max_samples, X.shape[0]), random_state=seed)
    return forest.fit(X.astype(np.float32))


def fit_robust_z(X: np.ndarray, *, combine: str = "rms") -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Median and MAD per feature. A zero MAD falls back to the mean absolute deviation, and a
    constant feature to scale 1, so that no scale is ever zero."""
    med = np.median(X, axis=0)
    dev = np.abs(X - med)
    scale = MAD_TO_SIGMA * np.median(dev, axis=0)
    meanad = MEANAD_TO_SIGMA * dev.mean(axis=0)
    scale = np.where(scale > 0, scale, np.where(meanad > 0, meanad, 1.0))
    detector = {"kind": "robust_z", "params": {"combine": combine}}
    return detector, {"rz_median": med, "rz_scale_inv": 1.0 / scale}


def default_bins(n: int) -> int:
    return int(np.clip(round(np.sqrt(n)), 10, 50))


def fit_hbos(X: np.ndarray, *, n_bins: int | None = None, alpha: float = 1.0) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Equal-width histograms per feature over the training range, plus below/above slots."""
    n, d = X.shape
    n_bins = default_bins(n) if n_bins is None else int(n_bins)
    if n_bins < 1:
        raise InvalidInputError(f"n_bins must be >= 1; got {n_bins}")
    lo, hi = X.min(axis=0), X.max(axis=0)
    width = (hi - lo) / n_bins
    inv_width = np.where(width > 0, 1.0 / np.where(width > 0, width, 1.0), 0.0)
    table = np.empty((d, n_bins + 2))
    for j in range(d):
        k = np.minimum(((X[:, j] - lo[j]) * inv_width[j]).astype(np.int64), n_bins - 1)
        counts = np.zeros(n_bins + 2)
        counts[1:-1] = np.bincount(k, minlength=n_bins)
        table[j] = np.log(counts.max() + alpha) - np.log(counts + alpha)
    detector = {"kind": "hbos", "params": {"n_bins": n_bins, "alpha": alpha}}
    return detector, {"hb_lo": lo, "hb_hi": hi, "hb_inv_width": inv_width, "hb_table": table}


def reference_sample(X: np.ndarray, *, seed: int = 0, max_rows: int = 4096) -> np.ndarray:
    """A seeded random sample of ``min(n, max_rows)`` rows of ``X`` (in their original order), float64."""
    X = np.asarray(X, dtype=np.float64)
    n = X.shape[0]
    if n <= max_rows:
        return np.ascontiguousarray(X)
    rows = np.sort(np.random.default_rng(seed).choice(n, size=max_rows, replace=False))
    return np.ascontiguousarray(X[rows])


def fit_knn(X: np.ndarray, *, k: int = DEFAULT_K, seed: int = 0, max_reference: int = 4096) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """kNN distance: score = Euclidean distance to the k-th nearest record of a stored reference
    sample (``min(n, max_reference)`` preprocessed training rows, seeded). ``k`` is capped at the
    sample size."""
    from outlierd.core.knn import Neighbors

    if k < 1:
        raise InvalidInputError(f"k must be >= 1; got {k}")
    ref = reference_sample(X, seed=seed, max_rows=max_reference)
    if ref.shape[0] < 1:
        raise InvalidInputError("knn needs at least one training record")
    k_eff = min(int(k), ref.shape[0])
    nn = Neighbors("knn", ref, k_eff, np.empty(0), np.empty(0))
    detector = {"kind": "knn", "params": {"k": k_eff, "k_requested": int(k), "metric": "euclidean",
                                          "reference_rows": int(ref.shape[0]), "seed": int(seed),
                                          "score": "distance to the k-th nearest reference record"}}
    return detector, nn.arrays()


def fit_lof(X: np.ndarray, *, k: int = DEFAULT_K, seed: int = 0, max_reference: int = 4096) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Local outlier factor (novelty) against a stored reference sample, with scikit-learn's
    definitions: the reference's k-distances and local reachability densities are computed here and
    stored. ``k`` is capped at the sample size - 1 (as scikit-learn does)."""
    from outlierd.core.knn import Neighbors, lof_tables

    if k < 1:
        raise InvalidInputError(f"k must be >= 1; got {k}")
    ref = reference_sample(X, seed=seed, max_rows=max_reference)
    if ref.shape[0] < 2:
        raise InvalidInputError("lof needs at least two training records")
    k_eff = min(int(k), ref.shape[0] - 1)
    kdist, lrd = lof_tables(ref, k_eff)
    nn = Neighbors("lof", ref, k_eff, kdist, lrd)
    detector = {"kind": "lof", "params": {"k": k_eff, "k_requested": int(k), "metric": "euclidean",
                                          "reference_rows": int(ref.shape[0]), "seed": int(seed),
                                          "score": "local outlier factor against the reference sample"}}
    return detector, nn.arrays()


def fit_hst(X: np.ndarray, *, seed: int = 0, n_trees: int = 25, height: int = 15,
            window_size: int = 250) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Half-Space Trees (running min-max scaling, River's semantics) that have learned ``X`` in order;
    the arrays are its initial state when served. Defaults: 25 trees of height 15, window 250."""
    from outlierd.core.hst import HalfSpaceTrees

    m = HalfSpaceTrees.new(X.shape[1], n_trees=n_trees, height=height, window_size=window_size, minmax=True, seed=seed)
    m.update(X)
    return {"kind": "hst", "params": {**m.params(), "seed": seed}}, m.arrays()


def fit_rshash(X: np.ndarray, *, seed: int = 0, n_components: int = 100,
               window_size: int = 256) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Streaming RS-Hash that has learned ``X`` in order; the arrays are its initial state when served."""
    from outlierd.core.rshash import RSHash

    m = RSHash.new(X.shape[1], n_components=n_components, window_size=window_size, seed=seed)
    m.update(X)
    return {"kind": "rshash", "params": {**m.params(), "seed": seed}}, m.arrays()
