"""Slow, obviously correct float64 NumPy oracles for the kernels (no Numba, no layout tricks)."""

from __future__ import annotations

import math

import numpy as np

F32_MAX = float(np.finfo(np.float32).max)


def prep(X, median, center=None, scale_inv=None):
    """NaN -> median, +/-inf -> +/-FLT_MAX, then (x - center) * scale_inv, float64."""
    X = np.array(X, dtype=np.float64)
    d = X.shape[1]
    center = np.zeros(d) if center is None else center
    scale_inv = np.ones(d) if scale_inv is None else scale_inv
    out = np.empty_like(X)
    for i in range(X.shape[0]):
        for j in range(d):
            v = X[i, j]
            if np.isnan(v):
                v = median[j]
            elif v == np.inf:
                v = F32_MAX
            elif v == -np.inf:
                v = -F32_MAX
            out[i, j] = (v - center[j]) * scale_inv[j]
    return out


def robust_z(Xp, med, scale_inv, combine="rms"):
    z = (Xp - med) * scale_inv
    if combine == "max":
        return np.abs(z).max(axis=1)
    return np.sqrt((z * z).mean(axis=1))


def hbos(Xp, lo, hi, inv_width, table):
    n_bins = table.shape[1] - 2
    out = np.zeros(Xp.shape[0])
    for i in range(Xp.shape[0]):
        for j in range(Xp.shape[1]):
            v = Xp[i, j]
            if v < lo[j]:
                s = 0
            elif v > hi[j]:
                s = n_bins + 1
            else:
                s = 1 + min(int(np.floor((v - lo[j]) * inv_width[j])), n_bins - 1)
            out[i] += table[j, s]
    return out


def iforest(forest, X):
    """Walk sklearn's own trees node by node (float32 inputs, float64 thresholds, as sklearn does)."""
    X = np.asarray(X, dtype=np.float32)
    n = X.shape[0]
    depths = np.zeros(n)
    for est, feats in zip(forest.estimators_, forest.estimators_features_):
        t = est.tree_
        for i in range(n):
            node, depth = 0, 0
            while t.children_left[node] >= 0:
                x = X[i, feats[t.feature[node]]]
                node = t.children_left[node] if x <= t.threshold[node] else t.children_right[node]
                depth += 1
            m = t.n_node_samples[node]
            c = 0.0 if m <= 1 else 1.0 if m == 2 else 2 * (np.log(m - 1) + np.euler_gamma) - 2 * (m - 1) / m
            depths[i] += depth + c
    psi = forest._max_samples
    c_psi = 2 * (np.log(psi - 1) + np.euler_gamma) - 2 * (psi - 1) / psi if psi > 2 else float(psi == 2)
    return 2.0 ** (-depths / (len(forest.estimators_) * c_psi))


def hst_prequential(feat, thr, X, window, minmax=True):
    """Half-Space Trees, score-then-learn per record, straight from the paper and River: explicit
    reference (r) and latest (l) mass lists per node, swapped at each window's end; optional running
    min-max scaling (River's MinMaxScaler); NaN goes to the child with the larger latest mass.
    Plain Python floats and lists (no NumPy in the loop) to stay fast enough for 100k records."""
    T, n_inner = feat.shape
    height = int(np.log2(n_inner + 1))
    n_nodes = 2 * n_inner + 1
    feat_l, thr_l = feat.tolist(), thr.tolist()
    ref = [[0] * n_nodes for _ in range(T)]
    latest = [[0] * n_nodes for _ in range(T)]
    rows = np.asarray(X, dtype=np.float64).tolist()
    d = len(rows[0])
    lo, hi = [math.inf] * d, [-math.inf] * d
    max_score = T * window * (2 ** (height + 1) - 1)
    out = [0.0] * len(rows)

    def scale(x):
        if not minmax:
            return x
        res = []
        for j in range(d):
            g = hi[j] - lo[j]
            res.append((x[j] - lo[j]) / g if g != 0 and math.isfinite(g) else (x[j] if math.isnan(x[j]) else 0.0))
        return res

    def child(t, k, x):
        v = x[feat_l[t][k]]
        if math.isnan(v):
            return 2 * k + 2 if latest[t][2 * k + 1] < latest[t][2 * k + 2] else 2 * k + 1
        return 2 * k + 1 if v < thr_l[t][k] else 2 * k + 2

    counter, first_window = 0, True
    for i, x in enumerate(rows):
        xs = scale(x)
        if not first_window:
            total = 0.0
            for t in range(T):
                k, s, pw, stopped = 0, 0.0, 1, False
                for _ in range(height):
                    s += ref[t][k] * pw
                    if ref[t][k] < 0.1 * window:
                        stopped = True
                        break
                    k = child(t, k, xs)
                    pw *= 2
                if not stopped:
                    s += ref[t][k] * pw
                total += s
            out[i] = 1.0 - total / max_score
        if minmax:
            for j in range(d):
                if x[j] < lo[j]:
                    lo[j] = x[j]
                if x[j] > hi[j]:
                    hi[j] = x[j]
        xl = scale(x)
        for t in range(T):
            k = 0
            for level in range(height + 1):
                latest[t][k] += 1
                if level < height:
                    k = child(t, k, xl)
        counter += 1
        if counter == window:
            ref, latest = latest, [[0] * n_nodes for _ in range(T)]
            counter, first_window = 0, False
    return np.array(out)


def rshash_prequential(dims, alpha, f, mult, window, n_buckets, n_rows, X):
    """Streaming RS-Hash, score-then-learn per record, with Python integers for the hash (mod 2**64):
    running min-max scaling, grid cells per component subspace, count-min over the last complete window."""
    M64 = (1 << 64) - 1
    m, d = alpha.shape
    mult = [int(v) for v in mult]
    ref = np.zeros((m, n_rows, n_buckets), dtype=np.int64)
    cur = np.zeros_like(ref)
    lo, hi = np.full(d, np.inf), np.full(d, -np.inf)

    def buckets(x, c):
        cell = [-1] * d
        for j in dims[c]:
            if j < 0:
                break
            g = hi[j] - lo[j]
            v = (x[j] - lo[j]) / g if g > 0 else 0.0
            cell[j] = math.floor((v + alpha[c, j]) / f[c])
        out = []
        for r in range(n_rows):
            h = c * 131 + r
            for j in range(d):
                h = ((h ^ ((cell[j] + 2) & M64)) * mult[r]) & M64
                h ^= h >> 29
            out.append(h % n_buckets)
        return out

    scores = np.zeros(len(X))
    for i, x in enumerate(np.asarray(X, dtype=np.float64)):
        if i >= window:
            scores[i] = -np.mean([math.log2(min(ref[c, r, b] for r, b in enumerate(buckets(x, c))) + 1.0) for c in range(m)])
        lo, hi = np.minimum(lo, x), np.maximum(hi, x)
        for c in range(m):
            for r, b in enumerate(buckets(x, c)):
                cur[c, r, b] += 1
        if (i + 1) % window == 0:
            ref, cur = cur, np.zeros_like(cur)
    return scores
