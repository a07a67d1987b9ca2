"""Half-Space Trees (Tan, Ting & Liu 2011) as Numba kernels: a streaming detector that learns as it scores.

Same algorithm and the same random structure as River's ``anomaly.HalfSpaceTrees`` (optionally behind
its ``preprocessing.MinMaxScaler``): given the same seed, the trees are built by the same calls on a
``random.Random`` and every score equals River's. Score direction: **higher = more anomalous**, in
``[0, 1]``; the first window scores 0 (no reference masses yet). Values must be finite (a served
model imputes missing values before the detector).

State is fixed-size arrays (memory set by ``n_trees``, ``height`` and ``window_size``, not by the
stream's length). Every tree is a complete binary tree in heap order (children of ``k``: ``2k+1``,
``2k+2``). What makes it fast: within a window, a score reads only the reference masses (the last
complete window's), never the latest ones, so learning can wait for the window's end; and a score
stops at the first node whose reference mass is below ``0.1 * window_size``, so only the masses of
nodes whose parent reaches that limit are ever read. At a window's end each tree partitions the
window's records top-down and counts them into such nodes only (about log2(10) + 2 levels a
record, instead of ``height + 1``); masses elsewhere are stale and never read. The records of the
window in progress are part of the state (``buf``).
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import numba as nb
import numpy as np

from .errors import ArtifactError, InvalidInputError

PADDING = 0.15  # River's make_padded_tree padding: no split closer than 15% to its cell's edge
CHUNK = 16384  # records per pass: bounds the per-tree score buffer


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


@nb.njit(nogil=True, cache=True)
def _score_tree(t, Xs, lo, hi, height, feat, thr, psum, stop, out):
    """Tree ``t``'s partial scores of ``Xs[lo:hi]``: walk down to the first node where River's walk
    stops and take that node's path sum. Branch-free and four records at a time, so that their
    chains of dependent loads overlap; a stopped walk stays on its node."""
    last = feat.shape[1] - 1  # clamp for a leaf's (unused) split lookup
    i = lo
    while i + 4 <= hi:
        k0 = k1 = k2 = k3 = 0
        for _ in range(height):  # height: the deepest node where a walk of this window stops
            s0, s1, s2, s3 = stop[t, k0], stop[t, k1], stop[t, k2], stop[t, k3]
            if s0 and s1 and s2 and s3:  # duplicates can keep one path heavy down to the leaves
                break
            j0, j1, j2, j3 = min(k0, last), min(k1, last), min(k2, last), min(k3, last)
            c0 = 2 * k0 + 1 + (Xs[i, feat[t, j0]] >= thr[t, j0])
            c1 = 2 * k1 + 1 + (Xs[i + 1, feat[t, j1]] >= thr[t, j1])
            c2 = 2 * k2 + 1 + (Xs[i + 2, feat[t, j2]] >= thr[t, j2])
            c3 = 2 * k3 + 1 + (Xs[i + 3, feat[t, j3]] >= thr[t, j3])
            k0 = k0 if s0 else c0
            k1 = k1 if s1 else c1
            k2 = k2 if s2 else c2
            k3 = k3 if s3 else c3
        out[t, i] = psum[t, k0]
        out[t, i + 1] = psum[t, k1]
        out[t, i + 2] = psum[t, k2]
        out[t, i + 3] = psum[t, k3]
        i += 4
    for j in range(i, hi):
        k = 0
        while not stop[t, k]:
            k = 2 * k + 1 if Xs[j, feat[t, k]] < thr[t, k] else 2 * k + 2
        out[t, j] = psum[t, k]


@nb.njit(nogil=True, cache=True)
def _close_window(t, Xw, a, window, height, size_limit, feat, thr, psum, stop, idx, stack):
    """Window ``Xw[a:a + window]`` becomes tree ``t``'s reference: for every node a score can reach,
    ``psum`` = sum of ``mass * 2**depth`` along its path (River's running score) and ``stop`` =
    River's walk ends there (mass below ``size_limit``, or a leaf). Records are partitioned top-down
    and only nodes under a parent that reaches ``size_limit`` are counted."""
    for j in range(window):
        idx[j] = a + j
    psum[t, 0] = float(window)
    stop[t, 0] = window < size_limit or height == 0
    if stop[t, 0]:
        return 0
    deepest = 0
    stack[0, 0], stack[0, 1], stack[0, 2], stack[0, 3] = 0, 0, window, 0
    top = 1
    while top > 0:
        top -= 1
        k, s0, s1, depth = stack[top, 0], stack[top, 1], stack[top, 2], stack[top, 3]
        f, th = feat[t, k], thr[t, k]
        m = s0  # partition: records going left first (a branch-free two-sided one measured slower)
        for j in range(s0, s1):
            r = idx[j]
            if Xw[r, f] < th:
                idx[j], idx[m] = idx[m], r
                m += 1
        c0 = 2 * k + 1
        pw = float(1 << (depth + 1))
        leaf = depth + 1 == height
        for c, cs0, cs1 in ((c0, s0, m), (c0 + 1, m, s1)):
            cnt = cs1 - cs0
            psum[t, c] = psum[t, k] + cnt * pw
            stop[t, c] = leaf or cnt < size_limit
            if stop[t, c]:
                deepest = max(deepest, depth + 1)
            else:
                stack[top, 0], stack[top, 1], stack[top, 2], stack[top, 3] = c, cs0, cs1, depth + 1
                top += 1
    return deepest


@nb.njit(nogil=True, cache=True)
def _tree_stream(t, Xs, Xw, nbuf, scored0, do_score, do_learn, window, height, size_limit, feat, thr, psum, stop, deep, out,
                 idx, stack):
    """Tree ``t`` over one call, in stream order. ``Xw``: the window in progress (``nbuf`` rows)
    followed by this call's records (learning form); ``Xs``: this call's records (scoring form);
    ``scored0``: whether a window has closed before (else scores are left at 0)."""
    n = Xs.shape[0]
    if not do_learn:
        if scored0:
            _score_tree(t, Xs, 0, n, deep[t], feat, thr, psum, stop, out)
        return
    total = nbuf + n
    closed = scored0
    a = 0
    while a < total:
        b = min(a + window, total)
        lo, hi = max(a, nbuf) - nbuf, b - nbuf  # this call's records in window [a, b)
        if do_score and closed and hi > lo:
            _score_tree(t, Xs, lo, hi, deep[t], feat, thr, psum, stop, out)
        if b - a == window:
            deep[t] = _close_window(t, Xw, a, window, height, size_limit, feat, thr, psum, stop, idx, stack)
            closed = True
        a = b


@nb.njit(nogil=True, cache=True, parallel=True)
def _run_parallel(Xs, Xw, nbuf, scored0, do_score, do_learn, window, height, size_limit, feat, thr, psum, stop, deep, out):
    # Trees are independent given the stream: one task per tree, no shared writes.
    for t in nb.prange(feat.shape[0]):
        idx = np.empty(window, np.int64)
        stack = np.empty((2 * height + 2, 4), np.int64)
        _tree_stream(t, Xs, Xw, nbuf, scored0, do_score, do_learn, window, height, size_limit, feat, thr, psum, stop, deep, out,
                     idx, stack)


@nb.njit(nogil=True, cache=True)
def _run_serial(Xs, Xw, nbuf, scored0, do_score, do_learn, window, height, size_limit, feat, thr, psum, stop, deep, out):
    idx = np.empty(window, np.int64)
    stack = np.empty((2 * height + 2, 4), np.int64)
    for t in range(feat.shape[0]):
        _tree_stream(t, Xs, Xw, nbuf, scored0, do_score, do_learn, window, height, size_limit, feat, thr, psum, stop, deep, out,
                     idx, stack)


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
def _minmax(X, lo, hi, do_score, do_learn, Xs, Xl):
    """River's MinMaxScaler in stream order: a record is scored with the extremes seen before it
    and learned with the extremes including it."""
    n, d = X.shape
    for i in range(n):
        if do_score:
            for j in range(d):
                g = hi[j] - lo[j]
                Xs[i, j] = (X[i, j] - lo[j]) / g if g != 0.0 and np.isfinite(g) else (X[i, j] if np.isnan(X[i, j]) else 0.0)
        if do_learn:
            for j in range(d):
                v = X[i, j]
                if v < lo[j]:
                    lo[j] = v
                if v > hi[j]:
                    hi[j] = v
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
    # (T, 2**(h+1) - 1): River's running score at each node a score can reach in the last complete
    # window (float64), and whether its walk stops there (bool); other nodes hold stale values, never read
    psum: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    stop: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.bool_))
    deep: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # (T,) deepest stopping node's depth
    buf: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))  # (window_size, d) the window in progress
    lo: np.ndarray = field(default_factory=lambda: np.zeros(0))  # running min (minmax)
    hi: np.ndarray = field(default_factory=lambda: np.zeros(0))
    position: int = 0  # records learned so far; position % window_size of them are in buf

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
        self.psum = np.zeros((T, n_nodes))
        self.stop = np.ones((T, n_nodes), np.bool_)
        self.deep = np.zeros(T, np.int64)
        self.buf = np.zeros((self.window_size, self.n_features))
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
        if not np.all(np.isfinite(X)):
            bad = int(np.flatnonzero(~np.isfinite(X).all(axis=1))[0])
            raise InvalidInputError(f"record {bad} has NaN or inf; Half-Space Trees need finite values (impute them first)")
        n = X.shape[0]
        out = np.zeros(n, dtype=np.float64)
        run = _run_parallel if (parallel if parallel is not None else n >= 256) else _run_serial
        W = self.window_size
        for c0 in range(0, n, CHUNK):
            Xc = X[c0:c0 + CHUNK]
            if self.minmax:
                Xs, Xl = np.empty_like(Xc), np.empty_like(Xc)
                _minmax(Xc, self.lo, self.hi, do_score, do_learn, Xs, Xl)
            else:
                Xs = Xl = Xc
                if do_learn:  # kept for a later switch to minmax
                    np.fmin(self.lo, Xc.min(axis=0, initial=np.inf), out=self.lo)
                    np.fmax(self.hi, Xc.max(axis=0, initial=-np.inf), out=self.hi)
            nbuf = self.position % W
            Xw = np.concatenate((self.buf[:nbuf], Xl)) if do_learn else self.buf[:0]
            ts = np.zeros((self.n_trees, Xc.shape[0]), dtype=np.float64)
            run(Xs, Xw, nbuf, self.position >= W, do_score, do_learn, W, self.height, 0.1 * W,
                self.feat, self.thr, self.psum, self.stop, self.deep, ts)
            if do_score:
                _finish(ts, self.position, int(do_learn), W, self.max_score, out[c0:c0 + CHUNK])
            if do_learn:
                self.position += Xc.shape[0]
                rest = self.position % W
                self.buf[:rest] = Xw[Xw.shape[0] - rest:]
        return out

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
        return {"hst_feat": self.feat, "hst_thr": self.thr, "hst_psum": self.psum, "hst_stop": self.stop, "hst_deep": self.deep, "hst_buf": self.buf,
                "hst_lo": self.lo, "hst_hi": self.hi, "hst_position": np.array([self.position], np.int64)}

    def params(self) -> dict[str, Any]:
        return {"n_trees": self.n_trees, "height": self.height, "window_size": self.window_size, "minmax": self.minmax}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], n_features: int, params: dict[str, Any]) -> HalfSpaceTrees:
        try:
            feat = np.ascontiguousarray(arrays["hst_feat"], np.int32)
            thr = np.ascontiguousarray(arrays["hst_thr"], np.float64)
            m = cls(feat, thr, int(params["window_size"]), bool(params["minmax"]),
                    np.array(arrays["hst_psum"], np.float64), np.array(arrays["hst_stop"], np.bool_),
                    np.array(arrays["hst_deep"], np.int64),
                    np.array(arrays["hst_buf"], np.float64),
                    np.array(arrays["hst_lo"], np.float64), np.array(arrays["hst_hi"], np.float64),
                    int(arrays["hst_position"][0]))
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise ArtifactError(f"HST state lacks or garbles {e}") from e
        T, n_inner = feat.shape if feat.ndim == 2 else (0, 0)
        if (T < 1 or thr.shape != feat.shape or m.psum.shape != (T, 2 * n_inner + 1) or m.stop.shape != m.psum.shape
                or m.deep.shape != (T,) or m.deep.min() < 0 or m.deep.max() > m.height or (n_inner + 1) & n_inner
                or m.buf.shape != (m.window_size, n_features) or m.lo.shape != (n_features,) or m.hi.shape != (n_features,)
                or feat.min() < 0 or feat.max() >= n_features or m.window_size < 1 or m.position < 0):
            raise ArtifactError(f"HST state arrays are inconsistent with {n_features} features")
        return m
