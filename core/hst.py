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
record, instead of ``height + 1``); masses elsewhere are stale and never read. Those nodes are also
laid out as a compact tree per tree (a few hundred bytes, derived, never saved) that scores walk.
The records of the window in progress are part of the state (``buf``).
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


U64 = nb.uint64
LOW = U64(0xFFFFFFFF)
SHIFT = U64(32)


@nb.njit(nogil=True, cache=True, inline="always")
def _node(child, feature):
    """A compact node's left child and split feature, packed in one word (one load per step)."""
    return U64(child) | (U64(feature) << SHIFT)


@nb.njit(nogil=True, cache=True)
def _score_tree(t, Xs, lo, hi, height, cnode, cthr, cpsum, out):
    """Tree ``t``'s partial scores of ``Xs[lo:hi]`` on its compact reference tree (the nodes a score can
    reach, a few hundred bytes: in L1). ``cnode[t, k]`` packs node ``k``'s left child (the right one is
    next to it) and split feature; a node where River's walk stops is its own child with threshold
    +inf, so a walk is branch-free and stays put once stopped. Eight records at a time, so that their
    chains of dependent loads overlap; ``height`` (the deepest stopping node) bounds the walk, and it
    ends early once all eight have stopped. Indices are unsigned: Numba then emits no wraparound
    code for negative ones (this halved the time of a step)."""
    nd, th, ps = cnode[t], cthr[t], cpsum[t]
    d = Xs.shape[1]
    Xf = Xs.ravel()  # C-contiguous: a view
    i = lo
    while i + 8 <= hi:
        k0 = k1 = k2 = k3 = k4 = k5 = k6 = k7 = U64(0)
        r0 = U64(i * d)
        r1, r2, r3, r4, r5, r6, r7 = r0 + U64(d), r0 + U64(2 * d), r0 + U64(3 * d), r0 + U64(4 * d), r0 + U64(5 * d), r0 + U64(6 * d), r0 + U64(7 * d)
        for _ in range(height):
            m0, m1, m2, m3, m4, m5, m6, m7 = nd[k0], nd[k1], nd[k2], nd[k3], nd[k4], nd[k5], nd[k6], nd[k7]
            n0 = (m0 & LOW) + U64(Xf[r0 + (m0 >> SHIFT)] >= th[k0])
            n1 = (m1 & LOW) + U64(Xf[r1 + (m1 >> SHIFT)] >= th[k1])
            n2 = (m2 & LOW) + U64(Xf[r2 + (m2 >> SHIFT)] >= th[k2])
            n3 = (m3 & LOW) + U64(Xf[r3 + (m3 >> SHIFT)] >= th[k3])
            n4 = (m4 & LOW) + U64(Xf[r4 + (m4 >> SHIFT)] >= th[k4])
            n5 = (m5 & LOW) + U64(Xf[r5 + (m5 >> SHIFT)] >= th[k5])
            n6 = (m6 & LOW) + U64(Xf[r6 + (m6 >> SHIFT)] >= th[k6])
            n7 = (m7 & LOW) + U64(Xf[r7 + (m7 >> SHIFT)] >= th[k7])
            if (n0 == k0) & (n1 == k1) & (n2 == k2) & (n3 == k3) & (n4 == k4) & (n5 == k5) & (n6 == k6) & (n7 == k7):
                break  # all stopped (a node that has children never is its own child)
            k0, k1, k2, k3, k4, k5, k6, k7 = n0, n1, n2, n3, n4, n5, n6, n7
        out[t, i] = ps[k0]
        out[t, i + 1] = ps[k1]
        out[t, i + 2] = ps[k2]
        out[t, i + 3] = ps[k3]
        out[t, i + 4] = ps[k4]
        out[t, i + 5] = ps[k5]
        out[t, i + 6] = ps[k6]
        out[t, i + 7] = ps[k7]
        i += 8
    for j in range(i, hi):
        k = U64(0)
        r = U64(j * d)
        while (nd[k] & LOW) != k:
            k = (nd[k] & LOW) + U64(Xf[r + (nd[k] >> SHIFT)] >= th[k])
        out[t, j] = ps[k]


@nb.njit(nogil=True, cache=True)
def _close_window(t, Xw, a, window, height, size_limit, feat, thr, psum, stop, cnode, cthr, cpsum, idx, stack):
    """Window ``Xw[a:a + window]`` becomes tree ``t``'s reference: for every node a score can reach,
    ``psum`` = sum of ``mass * 2**depth`` along its path (River's running score) and ``stop`` =
    River's walk ends there (mass below ``size_limit``, or a leaf). Records are partitioned top-down
    and only nodes under a parent that reaches ``size_limit`` are counted. The same nodes are laid
    out again, in the order they are reached, as the compact tree scores walk (``cnode`` ...)."""
    for j in range(window):
        idx[j] = a + j
    Xf = Xw.ravel()  # C-contiguous: a view
    ud = U64(Xw.shape[1])
    psum[t, 0] = float(window)
    stop[t, 0] = window < size_limit or height == 0
    cpsum[t, 0] = float(window)
    if stop[t, 0]:
        cnode[t, 0], cthr[t, 0] = _node(0, 0), np.inf
        return 0
    deepest = 0
    nxt = 1  # next free compact slot
    stack[0, 0], stack[0, 1], stack[0, 2], stack[0, 3], stack[0, 4] = 0, 0, window, 0, 0
    top = 1
    while top > 0:
        top -= 1
        k, s0, s1, depth, ck = stack[top, 0], stack[top, 1], stack[top, 2], stack[top, 3], stack[top, 4]
        f, th = feat[t, k], thr[t, k]
        # partition: records going left first (branch-free ones, Lomuto or two-sided, measured slower:
        # on clustered data most splits send nearly all records one way, which predicts well);
        # unsigned indices, so that Numba emits no wraparound code
        m = U64(s0)
        uf = U64(f)
        for j in range(U64(s0), U64(s1)):
            r = idx[j]
            if Xf[r * ud + uf] < th:
                idx[j] = idx[m]
                idx[m] = r
                m += U64(1)
        m = np.int64(m)
        c0 = 2 * k + 1
        cc0 = nxt
        nxt += 2
        cnode[t, ck], cthr[t, ck] = _node(cc0, f), th
        pw = float(1 << (depth + 1))
        leaf = depth + 1 == height
        for side in range(2):
            c, cc = c0 + side, cc0 + side
            cs0, cs1 = (s0, m) if side == 0 else (m, s1)
            cnt = cs1 - cs0
            psum[t, c] = psum[t, k] + cnt * pw
            cpsum[t, cc] = psum[t, c]
            stop[t, c] = leaf or cnt < size_limit
            if stop[t, c]:
                deepest = max(deepest, depth + 1)
                cnode[t, cc], cthr[t, cc] = _node(cc, 0), np.inf
            else:
                stack[top, 0], stack[top, 1], stack[top, 2], stack[top, 3], stack[top, 4] = c, cs0, cs1, depth + 1, cc
                top += 1
    return deepest


@nb.njit(nogil=True, cache=True)
def _compact_from_heap(t, height, feat, thr, psum, stop, cnode, cthr, cpsum, stack):
    """Tree ``t``'s compact tree rebuilt from its heap-ordered ``psum``/``stop`` (restoring saved state):
    the nodes reachable from the root through nodes that do not stop are exactly the last window's.
    False (nothing read out of bounds) when saved state has a leaf that does not stop or more nodes
    that do not stop than a window can give."""
    cap = cnode.shape[1]
    cpsum[t, 0] = psum[t, 0]
    if stop[t, 0]:
        cnode[t, 0], cthr[t, 0] = _node(0, 0), np.inf
        return True
    if height == 0:
        return False
    nxt = 1
    stack[0, 0], stack[0, 3], stack[0, 4] = 0, 0, 0
    top = 1
    while top > 0:
        top -= 1
        k, depth, ck = stack[top, 0], stack[top, 3], stack[top, 4]
        if nxt + 2 > cap:
            return False
        cc0 = nxt
        nxt += 2
        cnode[t, ck], cthr[t, ck] = _node(cc0, feat[t, k]), thr[t, k]
        for side in range(2):
            c, cc = 2 * k + 1 + side, cc0 + side
            cpsum[t, cc] = psum[t, c]
            if stop[t, c]:
                cnode[t, cc], cthr[t, cc] = _node(cc, 0), np.inf
            elif depth + 1 >= height or top + 1 >= stack.shape[0]:
                return False
            else:
                stack[top, 0], stack[top, 3], stack[top, 4] = c, depth + 1, cc
                top += 1
    return True


@nb.njit(nogil=True, cache=True)
def _tree_stream(t, Xs, Xw, nbuf, scored0, do_score, do_learn, window, height, size_limit, feat, thr, psum, stop, deep,
                 cnode, cthr, cpsum, out, idx, stack):
    """Tree ``t`` over one call, in stream order. ``Xw``: the window in progress (``nbuf`` rows)
    followed by this call's records (learning form); ``Xs``: this call's records (scoring form);
    ``scored0``: whether a window has closed before (else scores are left at 0)."""
    n = Xs.shape[0]
    if not do_learn:
        if scored0:
            _score_tree(t, Xs, 0, n, deep[t], cnode, cthr, cpsum, out)
        return
    total = nbuf + n
    closed = scored0
    a = 0
    while a < total:
        b = min(a + window, total)
        lo, hi = max(a, nbuf) - nbuf, b - nbuf  # this call's records in window [a, b)
        if do_score and closed and hi > lo:
            _score_tree(t, Xs, lo, hi, deep[t], cnode, cthr, cpsum, out)
        if b - a == window:
            deep[t] = _close_window(t, Xw, a, window, height, size_limit, feat, thr, psum, stop, cnode, cthr, cpsum,
                                    idx, stack)
            closed = True
        a = b


@nb.njit(nogil=True, cache=True, parallel=True)
def _run_parallel(Xs, Xw, nbuf, scored0, do_score, do_learn, window, height, size_limit, feat, thr, psum, stop, deep,
                  cnode, cthr, cpsum, out):
    # Trees are independent given the stream: one task per tree, no shared writes.
    for t in nb.prange(feat.shape[0]):
        idx = np.empty(window, np.uint64)
        stack = np.empty((2 * height + 2, 5), np.int64)
        _tree_stream(t, Xs, Xw, nbuf, scored0, do_score, do_learn, window, height, size_limit, feat, thr, psum, stop, deep,
                     cnode, cthr, cpsum, out, idx, stack)


@nb.njit(nogil=True, cache=True)
def _run_serial(Xs, Xw, nbuf, scored0, do_score, do_learn, window, height, size_limit, feat, thr, psum, stop, deep,
                cnode, cthr, cpsum, out):
    idx = np.empty(window, np.uint64)
    stack = np.empty((2 * height + 2, 5), np.int64)
    for t in range(feat.shape[0]):
        _tree_stream(t, Xs, Xw, nbuf, scored0, do_score, do_learn, window, height, size_limit, feat, thr, psum, stop, deep,
                     cnode, cthr, cpsum, out, idx, stack)


@nb.njit(nogil=True, cache=True)
def _compact_all(height, feat, thr, psum, stop, cnode, cthr, cpsum):
    stack = np.empty((2 * height + 2, 5), np.int64)
    for t in range(feat.shape[0]):
        if not _compact_from_heap(t, height, feat, thr, psum, stop, cnode, cthr, cpsum, stack):
            return t
    return -1


def compact_capacity(height: int) -> int:
    """Slots a compact tree needs: nodes that do not stop hold at least a tenth of the window each, so
    at most 10 of them per depth (11 against rounding), two children each, plus the root."""
    return min((1 << (height + 1)) - 1, 2 * 11 * height + 1)


BLOCK = 512  # records per task when summing the trees (a block of tree scores stays in L1/L2)


@nb.njit(nogil=True, cache=True, parallel=True)
def _finish(tree_scores, pos0, step, window, max_score, out):
    # Sum trees in order (River's order) so the float result is the same to the last bit; a block of
    # records at a time, tree by tree, so that rows of ``tree_scores`` are read in order.
    T, n = tree_scores.shape
    for b in nb.prange((n + BLOCK - 1) // BLOCK):
        lo, hi = b * BLOCK, min(n, (b + 1) * BLOCK)
        acc = np.zeros(hi - lo)
        for t in range(T):
            for i in range(lo, hi):
                acc[i - lo] += tree_scores[t, i]
        for i in range(lo, hi):
            out[i] = 0.0 if pos0 + i * step < window else 1.0 - acc[i - lo] / max_score


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
    # the compact reference trees scores walk (derived from psum/stop, rebuilt on restore, never saved):
    # (T, compact_capacity(h)) left child | split feature << 32 (a stopping node is its own child), threshold, psum
    cnode: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.uint64))
    cthr: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    cpsum: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))

    def __post_init__(self) -> None:
        T, c = self.feat.shape[0], compact_capacity(self.height)
        self.cnode = np.zeros((T, c), np.uint64)
        self.cthr = np.full((T, c), np.inf)
        self.cpsum = np.zeros((T, c))

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
        self.cnode[:] = 0
        self.cthr[:] = np.inf
        self.cpsum[:] = 0.0

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
            ts = np.empty((self.n_trees, Xc.shape[0]) if do_score else (self.n_trees, 0))  # each score written before read
            run(Xs, Xw, nbuf, self.position >= W, do_score, do_learn, W, self.height, 0.1 * W,
                self.feat, self.thr, self.psum, self.stop, self.deep, self.cnode, self.cthr, self.cpsum, ts)
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
        bad = _compact_all(m.height, m.feat, m.thr, m.psum, m.stop, m.cnode, m.cthr, m.cpsum)
        if bad >= 0:
            raise ArtifactError(f"HST state of tree {bad} is not one a window can leave (a leaf that does not stop, or too many nodes that do not)")
        return m
