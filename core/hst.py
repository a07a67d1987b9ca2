"""Half-Space Trees (Tan, Ting & Liu 2011) as Numba kernels: a streaming detector that learns as it scores.

Same algorithm and the same random structure as River's ``anomaly.HalfSpaceTrees`` (optionally behind
its ``preprocessing.MinMaxScaler``): given the same seed, the trees are built by the same calls on a
``random.Random`` and every score equals River's. Score direction: **higher = more anomalous**, in
``[0, 1]``; the first window scores 0 (no reference masses yet).

State is fixed-size arrays (memory set by ``n_trees`` and ``height``, not by the stream's length).
Every tree is a complete binary tree in heap order (children of ``k``: ``2k+1``, ``2k+2``). The two
mass profiles of the paper (reference window ``r``, latest window ``l``) are kept lazily per node:
``cur``, ``prev`` and the window number ``epoch`` they belong to, so the end of a window costs
nothing instead of a pass over every node:
  - ``l_mass`` = ``cur`` if ``epoch == w`` else 0;
  - ``r_mass`` = ``prev`` if ``epoch == w``, ``cur`` if ``epoch == w - 1``, else 0.
A NaN feature goes down the child with the larger latest mass (River's rule for a missing feature).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import numba as nb
import numpy as np

from .errors import ArtifactError, InvalidInputError

PADDING = 0.15  # River's make_padded_tree padding: no split closer than 15% to its cell's edge
CHUNK = 4096
_EPOCH_LIMIT = 1 << 30  # records per pass: bounds the per-tree score buffer


def build_structure(limits: np.ndarray, n_trees: int, height: int, seed: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Random split features and thresholds, ``(n_trees, 2**height - 1)`` each, drawn exactly as
    River's ``make_padded_tree`` draws them (pre-order, one ``random.Random(seed)`` for all trees)."""
    d = limits.shape[0]
    n_inner = (1 << height) - 1
    feat = np.zeros((n_trees, n_inner), dtype=np.int32)
    thr = np.zeros((n_trees, n_inner), dtype=np.float64)
    rng = random.Random(seed)
    population = list(range(d))
    lim = [(float(lo), float(hi)) for lo, hi in limits]

    def grow(t: int, k: int, h: int) -> None:
        if h == 0:
            return
        on = rng.choices(population=population, weights=[b - a for a, b in lim])[0]
        a, b = lim[on]
        at = rng.uniform(a + PADDING * (b - a), b - PADDING * (b - a))
        feat[t, k], thr[t, k] = on, at
        lim[on] = (a, at)
        grow(t, 2 * k + 1, h - 1)
        lim[on] = (at, b)
        grow(t, 2 * k + 2, h - 1)
        lim[on] = (a, b)

    for t in range(n_trees):
        grow(t, 0, height)
    return feat, thr


@nb.njit(nogil=True, cache=True, inline="always")
def _r_mass(mass, t, k, w):
    e = mass[t, k, 2]
    if e == w:
        return mass[t, k, 1]
    if e == w - 1:
        return mass[t, k, 0]
    return 0


@nb.njit(nogil=True, cache=True, inline="always")
def _child(x, f, th, mass, t, k, w):
    v = x[f]
    if v < th:
        return 2 * k + 1
    if v >= th:
        return 2 * k + 2
    # NaN: the child with the larger latest mass (River's rule for a missing feature)
    c0 = 2 * k + 1
    l0 = mass[t, c0, 0] if mass[t, c0, 2] == w else 0
    l1 = mass[t, c0 + 1, 0] if mass[t, c0 + 1, 2] == w else 0
    return c0 + 1 if l0 < l1 else c0


@nb.njit(nogil=True, cache=True)
def _leaves(t, X, height, feat, thr, leaf):
    """Leaf (heap index) each record reaches, or -1 for a record with NaN on its path (its path
    depends on the masses). Branch-free, independent of the masses, and four records at a time, so
    the four chains of dependent loads overlap in the CPU (about twice as fast as one at a time)."""
    n = X.shape[0]
    i = 0
    while i + 4 <= n:
        k0 = k1 = k2 = k3 = 0
        b0 = b1 = b2 = b3 = False
        for _ in range(height):
            v0 = X[i, feat[t, k0]]
            v1 = X[i + 1, feat[t, k1]]
            v2 = X[i + 2, feat[t, k2]]
            v3 = X[i + 3, feat[t, k3]]
            b0 |= v0 != v0
            b1 |= v1 != v1
            b2 |= v2 != v2
            b3 |= v3 != v3
            k0 = 2 * k0 + 1 + (v0 >= thr[t, k0])
            k1 = 2 * k1 + 1 + (v1 >= thr[t, k1])
            k2 = 2 * k2 + 1 + (v2 >= thr[t, k2])
            k3 = 2 * k3 + 1 + (v3 >= thr[t, k3])
        leaf[i] = -1 if b0 else k0
        leaf[i + 1] = -1 if b1 else k1
        leaf[i + 2] = -1 if b2 else k2
        leaf[i + 3] = -1 if b3 else k3
        i += 4
    while i < n:
        k = 0
        bad = False
        for _ in range(height):
            v = X[i, feat[t, k]]
            bad |= v != v
            k = 2 * k + 1 + (v >= thr[t, k])
        leaf[i] = -1 if bad else k
        i += 1


@nb.njit(nogil=True, cache=True)
def _tree_pass(t, Xs, Xl, same, pos0, window, height, size_limit, feat, thr, mass, do_score, do_learn, out, leaf_l):
    """One tree over records ``Xs``/``Xl`` (scaled for scoring / learning), in stream order.
    ``mass[t, k]`` = (cur, prev, epoch) of node ``k``: one cache line per node visit. A path is
    the leaf's ancestors (``((leaf + 1) >> (height - level)) - 1``): known before any mass is read."""
    n = Xs.shape[0]
    if do_learn:
        _leaves(t, Xl, height, feat, thr, leaf_l)
    top = height
    step = 1 if do_learn else 0  # scoring alone does not move the stream
    for i in range(n):
        w = (pos0 + i * step) // window
        if do_score:
            ls = leaf_l[i] if do_learn and same[i] else -1  # else walk it: scoring stops early anyway
            k = 0
            depth_pow = 1
            s = 0.0
            early = False
            for level in range(height):
                r = _r_mass(mass, t, k, w)
                s += r * depth_pow
                if r < size_limit:
                    early = True
                    break
                if ls >= 0:
                    k = ((ls + 1) >> (top - level - 1)) - 1
                else:
                    k = _child(Xs[i], feat[t, k], thr[t, k], mass, t, k, w)
                depth_pow <<= 1
            if not early:
                s += _r_mass(mass, t, k, w) * depth_pow
            out[t, i] = s
        if do_learn:
            ll = leaf_l[i]
            k = 0
            for level in range(height + 1):
                if mass[t, k, 2] != w:
                    mass[t, k, 1] = mass[t, k, 0] if mass[t, k, 2] == w - 1 else 0
                    mass[t, k, 0] = 0
                    mass[t, k, 2] = w
                mass[t, k, 0] += 1
                if level < height:
                    if ll >= 0:
                        k = ((ll + 1) >> (top - level - 1)) - 1
                    else:
                        k = _child(Xl[i], feat[t, k], thr[t, k], mass, t, k, w)


@nb.njit(nogil=True, cache=True, parallel=True)
def _run_parallel(Xs, Xl, same, pos0, window, height, size_limit, feat, thr, mass, do_score, do_learn, out):
    # Trees are independent given the stream: one task per tree, no shared writes.
    n = Xs.shape[0]
    for t in nb.prange(feat.shape[0]):
        leaf_l = np.empty(n, np.int64)
        _tree_pass(t, Xs, Xl, same, pos0, window, height, size_limit, feat, thr, mass, do_score, do_learn, out, leaf_l)


@nb.njit(nogil=True, cache=True)
def _run_serial(Xs, Xl, same, pos0, window, height, size_limit, feat, thr, mass, do_score, do_learn, out):
    n = Xs.shape[0]
    leaf_l = np.empty(n, np.int64)
    for t in range(feat.shape[0]):
        _tree_pass(t, Xs, Xl, same, pos0, window, height, size_limit, feat, thr, mass, do_score, do_learn, out, leaf_l)


@nb.njit(nogil=True, cache=True)
def _finish(tree_scores, pos0, step, window, max_score, out):
    # Sum trees in order (River's order) so the float result is the same to the last bit.
    T, n = tree_scores.shape
    for i in range(n):
        if pos0 + i * step < window:
            out[i] = 0.0
            continue
        s = 0.0
        for t in range(T):
            s += tree_scores[t, i]
        out[i] = 1.0 - s / max_score


@nb.njit(nogil=True, cache=True)
def _minmax(X, lo, hi, do_score, do_learn, Xs, Xl, same):
    """River's MinMaxScaler in stream order: a record is scored with the extremes seen before it
    and learned with the extremes including it. NaN leaves the extremes alone and stays NaN.
    ``same[i]``: the record moved no extreme, so its two scaled forms are equal."""
    n, d = X.shape
    for i in range(n):
        same[i] = True
        if do_score:
            for j in range(d):
                g = hi[j] - lo[j]
                Xs[i, j] = (X[i, j] - lo[j]) / g if g != 0.0 and np.isfinite(g) else (X[i, j] if np.isnan(X[i, j]) else 0.0)
        if do_learn:
            for j in range(d):
                v = X[i, j]
                if v < lo[j]:
                    lo[j] = v
                    same[i] = False
                if v > hi[j]:
                    hi[j] = v
                    same[i] = False
            for j in range(d):
                g = hi[j] - lo[j]
                Xl[i, j] = (X[i, j] - lo[j]) / g if g != 0.0 else (X[i, j] if np.isnan(X[i, j]) else 0.0)


@dataclass
class HalfSpaceTrees:
    """Half-Space Trees with state. ``limits``: ``(d, 2)`` feature ranges the random splits are drawn
    in (River's ``limits``; ``[0, 1]`` after min-max scaling). ``minmax``: scale each feature online
    by the running min and max first (River's ``MinMaxScaler() | HalfSpaceTrees``)."""

    feat: np.ndarray  # (T, 2**h - 1) int32 split feature
    thr: np.ndarray  # (T, 2**h - 1) float64 split threshold
    window_size: int
    minmax: bool
    # (T, 2**(h+1) - 1, 4) int32: cur, prev, epoch (window number - epoch_base), padding to 16 bytes
    mass: np.ndarray = field(default_factory=lambda: np.zeros((0, 0, 4), np.int32))
    lo: np.ndarray = field(default_factory=lambda: np.zeros(0))  # running min (minmax)
    hi: np.ndarray = field(default_factory=lambda: np.zeros(0))
    position: int = 0  # records learned so far
    epoch_base: int = 0  # windows subtracted from the stored epochs, so int32 never overflows

    @classmethod
    def new(cls, n_features: int, n_trees: int = 10, height: int = 8, window_size: int = 250,
            limits: np.ndarray | None = None, minmax: bool = True, seed: int | None = 0) -> HalfSpaceTrees:
        """A fresh model (River's defaults: 10 trees of height 8, window 250)."""
        if n_trees < 1 or not 1 <= height <= 24 or window_size < 1 or n_features < 1:
            raise InvalidInputError(f"HST needs n_trees >= 1, 1 <= height <= 24, window_size >= 1; got {n_trees}, {height}, {window_size}")
        lim = np.tile([0.0, 1.0], (n_features, 1)) if limits is None else np.asarray(limits, dtype=np.float64)
        if lim.shape != (n_features, 2) or not np.all(np.isfinite(lim)) or np.any(lim[:, 1] < lim[:, 0]):
            raise InvalidInputError(f"limits must be finite (n_features, 2) = ({n_features}, 2) with lo <= hi; got shape {lim.shape}")
        feat, thr = build_structure(lim, n_trees, height, seed)
        m = cls(feat, thr, int(window_size), bool(minmax), lo=np.full(n_features, np.inf), hi=np.full(n_features, -np.inf))
        m.reset()
        return m

    def reset(self) -> None:
        """Forget everything learned; keep the random structure."""
        T, n_nodes = self.feat.shape[0], 2 * self.feat.shape[1] + 1
        self.mass = np.zeros((T, n_nodes, 4), np.int32)
        self.mass[:, :, 2] = -2
        self.epoch_base = 0
        self.lo = np.full(self.n_features, np.inf)
        self.hi = np.full(self.n_features, -np.inf)
        self.position = 0

    @property
    def n_trees(self) -> int:
        return int(self.feat.shape[0])

    @property
    def height(self) -> int:
        return int(self.feat.shape[1] + 1).bit_length() - 1

    @property
    def n_features(self) -> int:
        return int(self.lo.size)

    @property
    def max_score(self) -> float:
        return float(self.n_trees * self.window_size * ((1 << (self.height + 1)) - 1))

    def _run(self, X: np.ndarray, do_score: bool, do_learn: bool, parallel: bool | None) -> np.ndarray:
        X = np.ascontiguousarray(X, dtype=np.float64)
        if X.ndim != 2 or X.shape[1] != self.lo.size:
            raise InvalidInputError(f"X must be (n_records, {self.lo.size}); got shape {X.shape}")
        n = X.shape[0]
        out = np.zeros(n, dtype=np.float64)
        run = _run_parallel if (parallel if parallel is not None else n >= 256) else _run_serial
        h = self.height
        for c0 in range(0, n, CHUNK):
            Xc = X[c0:c0 + CHUNK]
            same = np.ones(Xc.shape[0], dtype=np.bool_)
            if self.minmax:
                Xs, Xl = np.empty_like(Xc), np.empty_like(Xc)
                _minmax(Xc, self.lo, self.hi, do_score, do_learn, Xs, Xl, same)
            else:
                Xs = Xl = Xc
                if do_learn:  # kept for a later switch to minmax; costs one pass
                    np.fmin(self.lo, np.nanmin(Xc, axis=0, initial=np.inf), out=self.lo)
                    np.fmax(self.hi, np.nanmax(Xc, axis=0, initial=-np.inf), out=self.hi)
            self._rebase(Xc.shape[0])
            ts = np.zeros((self.n_trees, Xc.shape[0]), dtype=np.float64)
            run(Xs, Xl, same, self.position - self.epoch_base * self.window_size, self.window_size, h, 0.1 * self.window_size,
                self.feat, self.thr, self.mass, do_score, do_learn, ts)
            if do_score:
                _finish(ts, self.position, int(do_learn), self.window_size, self.max_score, out[c0:c0 + CHUNK])
            if do_learn:
                self.position += Xc.shape[0]
        return out

    def _rebase(self, n: int) -> None:
        # Only "this window" and "the one before" matter: older epochs can move down together.
        if (self.position + n) // self.window_size - self.epoch_base < _EPOCH_LIMIT:
            return
        shift = _EPOCH_LIMIT // 2
        ep = self.mass[:, :, 2]
        np.copyto(ep, np.maximum(ep.astype(np.int64) - shift, -2).astype(np.int32))
        self.epoch_base += shift

    def score(self, X: np.ndarray, parallel: bool | None = None) -> np.ndarray:
        """Scores of ``X`` ``(n, d)`` against the current state, which is left unchanged."""
        if not self.minmax:
            return self._run(X, True, False, parallel)
        lo, hi = self.lo.copy(), self.hi.copy()  # scoring alone must not move the scaler
        out = self._run(X, True, False, parallel)
        self.lo, self.hi = lo, hi
        return out

    def update(self, X: np.ndarray, parallel: bool | None = None) -> None:
        """Learn ``X`` in order."""
        self._run(X, False, True, parallel)

    def score_update(self, X: np.ndarray, parallel: bool | None = None) -> np.ndarray:
        """Prequential: score each record against the state before it, then learn it."""
        return self._run(X, True, True, parallel)

    # ------------------------------------------------------------------ state as arrays (no pickle)

    def arrays(self) -> dict[str, np.ndarray]:
        return {"hst_feat": self.feat, "hst_thr": self.thr, "hst_mass": self.mass, "hst_lo": self.lo, "hst_hi": self.hi,
                "hst_position": np.array([self.position, self.epoch_base], np.int64)}

    def params(self) -> dict[str, Any]:
        return {"n_trees": self.n_trees, "height": self.height, "window_size": self.window_size, "minmax": self.minmax}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], n_features: int, params: dict[str, Any]) -> HalfSpaceTrees:
        try:
            feat = np.ascontiguousarray(arrays["hst_feat"], np.int32)
            thr = np.ascontiguousarray(arrays["hst_thr"], np.float64)
            m = cls(feat, thr, int(params["window_size"]), bool(params["minmax"]),
                    np.array(arrays["hst_mass"], np.int32), np.array(arrays["hst_lo"], np.float64),
                    np.array(arrays["hst_hi"], np.float64), int(arrays["hst_position"][0]), int(arrays["hst_position"][1]))
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise ArtifactError(f"HST state lacks or garbles {e}") from e
        T, n_inner = feat.shape if feat.ndim == 2 else (0, 0)
        if (T < 1 or thr.shape != feat.shape or m.mass.shape != (T, 2 * n_inner + 1, 4)
                or (n_inner + 1) & n_inner or m.lo.shape != (n_features,) or m.hi.shape != (n_features,)
                or feat.min() < 0 or feat.max() >= n_features or m.window_size < 1 or m.position < 0):
            raise ArtifactError(f"HST state arrays are inconsistent with {n_features} features")
        return m
