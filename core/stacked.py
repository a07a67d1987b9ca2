"""The semi-supervised ``stacked`` detector: unsupervised detectors combined by a few labels.

An artifact of kind ``stacked`` holds several base detectors (any kind with a Numba kernel, e.g.
iforest, robust_z, hbos, knn), each with its own arrays stored under a prefix (``b0__``, ``b1__``…,
its preprocessing arrays included), and a linear model fitted on reviewers' labels. Per record ``x``:

- ``s_i``: the score of base ``i`` (its own kernel, higher = more anomalous);
- ``r_i = rank_i(s_i)``: its rank-normalised score in [0, 1], a piecewise-linear interpolation of
  the base's training-score distribution (``knots_i`` strictly increasing, ``levels_i`` from 0 to
  1; clamped outside the knots);
- ``z_j = clip((x~_j - center_j) * scale_inv_j, -clip, clip)``: standardised features, ``x~`` the
  record after the artifact's preprocessing (NaN imputed with the median, inf clipped);
- ``p = sigmoid(intercept + sum_i w_i r_i + sum_j v_j z_j)`` (logistic regression on the labels);
- score ``= (1 - alpha) * r_primary + alpha * p``, in [0, 1], higher = more anomalous.

``alpha`` (the weight of the labels) grows with the number of labelled anomalies, so a model
trained on few labels stays close to its unsupervised primary detector.

Explanations: feature ``j`` contributes ``alpha * v_j * z_j`` (its term in the label model's
logit, weighted as in the blend); the base detectors' ranks are not split into features.
Backends: ``numba`` only (the bases' Numba kernels; the combination in float64 NumPy).

Arrays: ``st_knots_<i>``, ``st_levels_<i>`` per base, ``st_center``, ``st_scale_inv`` (d,),
``st_coef`` (n_bases + d,), ``st_intercept`` (); manifest ``detector.params``: ``bases`` (a list
of ``{"kind", "params", "prefix", "preprocessing", "name"}``), ``primary``, ``alpha``, ``clip``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .backends import BUILDERS, register
from .errors import ArtifactError, InvalidInputError
from .preprocess import Preprocessing

KIND = "stacked"


def base_prefix(i: int) -> str:
    return f"b{i}__"


def rank_normalise(s: np.ndarray, knots: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """Piecewise-linear map of scores ``s`` through ``(knots, levels)``; clamped outside the knots."""
    return np.interp(np.asarray(s, dtype=np.float64), knots, levels)


def rank_table(train_scores: np.ndarray, max_knots: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """``(knots, levels)`` for :func:`rank_normalise` from a detector's training scores: the sorted
    scores (at most ``max_knots`` evenly spaced order statistics, min and max always kept), each at
    its empirical CDF level (position / (n - 1)); tied scores share the mean of their levels so the
    knots are strictly increasing."""
    s = np.sort(np.asarray(train_scores, dtype=np.float64))
    s = s[np.isfinite(s)]
    if s.size == 0:
        raise InvalidInputError("rank_table needs at least one finite score")
    if s.size == 1:
        return np.array([s[0], s[0] + 1.0]), np.array([0.0, 1.0])
    pos = np.unique(np.round(np.linspace(0, s.size - 1, min(max_knots, s.size))).astype(np.int64))
    vals, levels = s[pos], pos / (s.size - 1)
    knots, inverse = np.unique(vals, return_inverse=True)
    lev = np.bincount(inverse, weights=levels) / np.bincount(inverse)
    if knots.size == 1:  # a constant score: every record is mid-rank
        return np.array([knots[0], knots[0] + 1.0]), np.array([0.5, 0.5])
    return knots, lev


def sigmoid(t: np.ndarray) -> np.ndarray:
    # numerically safe on both tails
    t = np.asarray(t, dtype=np.float64)
    e = np.exp(-np.abs(t))
    return np.where(t >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@dataclass(frozen=True)
class Combination:
    """The label-fitted part of a stacked model (everything but the base detectors)."""

    knots: list[np.ndarray]
    levels: list[np.ndarray]
    center: np.ndarray
    scale_inv: np.ndarray
    coef: np.ndarray       # (n_bases + d,)
    intercept: float
    primary: int
    alpha: float
    clip: float

    def arrays(self) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for i, (k, lv) in enumerate(zip(self.knots, self.levels)):
            out[f"st_knots_{i}"], out[f"st_levels_{i}"] = k, lv
        out.update(st_center=self.center, st_scale_inv=self.scale_inv, st_coef=self.coef,
                   st_intercept=np.array(self.intercept, dtype=np.float64))
        return out

    def features(self, base_scores: np.ndarray, Xp: np.ndarray) -> np.ndarray:
        """The logistic model's inputs: ``[r_1..r_B, z_1..z_d]`` for base scores ``(n, B)`` and
        preprocessed records ``Xp`` ``(n, d)``."""
        r = np.column_stack([rank_normalise(base_scores[:, i], k, lv)
                             for i, (k, lv) in enumerate(zip(self.knots, self.levels))])
        z = np.clip((Xp - self.center) * self.scale_inv, -self.clip, self.clip)
        return np.hstack([r, z])

    def combine(self, base_scores: np.ndarray, Xp: np.ndarray) -> np.ndarray:
        F = self.features(base_scores, Xp)
        p = sigmoid(F @ self.coef + self.intercept)
        return (1.0 - self.alpha) * F[:, self.primary] + self.alpha * p

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], params: dict[str, Any], n_bases: int, d: int) -> Combination:
        try:
            knots = [np.ascontiguousarray(arrays[f"st_knots_{i}"], dtype=np.float64) for i in range(n_bases)]
            levels = [np.ascontiguousarray(arrays[f"st_levels_{i}"], dtype=np.float64) for i in range(n_bases)]
            center = np.ascontiguousarray(arrays["st_center"], dtype=np.float64)
            scale_inv = np.ascontiguousarray(arrays["st_scale_inv"], dtype=np.float64)
            coef = np.ascontiguousarray(arrays["st_coef"], dtype=np.float64)
            intercept = float(arrays["st_intercept"])
            primary, alpha, clip = int(params["primary"]), float(params["alpha"]), float(params["clip"])
        except KeyError as e:
            raise ArtifactError(f"stacked artifact lacks {e}") from e
        for k, lv in zip(knots, levels):
            if k.ndim != 1 or k.size < 2 or lv.shape != k.shape or not (np.all(np.isfinite(k)) and np.all(np.isfinite(lv))):
                raise ArtifactError("stacked rank tables must be finite 1-D arrays of equal length >= 2")
            if np.any(np.diff(k) <= 0) or np.any(np.diff(lv) < 0):
                raise ArtifactError("stacked rank knots must be strictly increasing and levels non-decreasing")
        if center.shape != (d,) or scale_inv.shape != (d,) or coef.shape != (n_bases + d,):
            raise ArtifactError(f"stacked arrays do not match {n_bases} bases and {d} features")
        if not all(np.all(np.isfinite(a)) for a in (center, scale_inv, coef)) or not np.isfinite(intercept):
            raise ArtifactError("stacked weights must be finite")
        if not (0 <= primary < n_bases and 0.0 <= alpha <= 1.0 and clip > 0):
            raise ArtifactError(f"stacked params out of range: primary {primary}, alpha {alpha}, clip {clip}")
        return cls(knots, levels, center, scale_inv, coef, intercept, primary, alpha, clip)


def split_arrays(arrays: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    """The arrays of one base: those under ``prefix``, with the prefix removed."""
    return {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}


class StackedScorer:
    """Scores every base with its own scorer (same batch, same serial/parallel choice), then
    combines them in float64 NumPy."""

    backend, device = "numba", "cpu"

    def __init__(self, bases: list[Callable[[np.ndarray, bool | None], np.ndarray]], prep: Preprocessing, comb: Combination):
        self._bases, self._prep, self._comb = bases, prep, comb

    def base_scores(self, X: np.ndarray, parallel: bool | None = None) -> np.ndarray:
        return np.column_stack([b(X, parallel) for b in self._bases]) if X.shape[0] else np.empty((0, len(self._bases)))

    def __call__(self, X: np.ndarray, parallel: bool | None = None) -> np.ndarray:
        if X.shape[0] == 0:
            return np.empty(0, dtype=np.float64)
        S = self.base_scores(X, parallel)  # the bases apply the missing-value policy (reject raises)
        return self._comb.combine(S, self._prep.transform(X))

    def contributions(self, X: np.ndarray) -> np.ndarray:
        """Per-feature attributions ``(n, d)``: ``alpha * v_j * z_j``, the feature's term in the
        label model's logit, weighted as in the blend (the base detectors' ranks are not split
        into features)."""
        c = self._comb
        z = np.clip((self._prep.transform(X) - c.center) * c.scale_inv, -c.clip, c.clip)
        return c.alpha * z * c.coef[len(self._bases):]

    def explain(self, X: np.ndarray, top_k: int, threshold: float, flagged_only: bool,
                parallel: bool | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        from .explain import empty_outputs, top_k_of

        scores = self(X, parallel)
        rows = np.flatnonzero(scores >= threshold) if flagged_only else np.arange(X.shape[0])
        feat, contrib = empty_outputs(X.shape[0], top_k)
        if rows.size:
            feat[rows], contrib[rows] = top_k_of(self.contributions(X[rows]), top_k)
        return scores, feat, contrib


def build_bases(detector: dict[str, Any], arrays: dict[str, np.ndarray], d: int, backend: str = "numba") -> list[Any]:
    """One scorer per base detector of a stacked manifest entry."""
    bases = detector.get("params", {}).get("bases")
    if not isinstance(bases, list) or not bases:
        raise ArtifactError("a stacked detector needs a non-empty params.bases list")
    out = []
    for i, base in enumerate(bases):
        try:
            kind, prefix = base["kind"], base["prefix"]
        except (KeyError, TypeError) as e:
            raise ArtifactError(f"stacked base {i} lacks {e}") from e
        if kind == KIND:
            raise ArtifactError("a stacked detector cannot contain another stacked detector")
        if (kind, backend) not in BUILDERS:
            raise ArtifactError(f"stacked base {i}: detector kind {kind!r} has no {backend!r} scorer")
        sub = split_arrays(arrays, prefix)
        prep = Preprocessing.from_artifact(base.get("preprocessing", {}), sub, d)
        out.append(BUILDERS[(kind, backend)]({"kind": kind, "params": base.get("params", {})}, sub, d, prep, "cpu", {}))
    return out


@register(KIND, "numba")
def _stacked_numba(detector, arrays, d, prep, device, files):
    bases = build_bases(detector, arrays, d)
    comb = Combination.from_arrays(arrays, detector.get("params", {}), len(bases), d)
    return StackedScorer(bases, prep, comb)
