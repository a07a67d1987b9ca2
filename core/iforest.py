"""Isolation Forest scoring on the CPU (Numba).

Score: ``s(x) = 2 ** (-E[h(x)] / c(psi))``, higher = more anomalous; numerically equal to
``-IsolationForest.score_samples(X)`` of scikit-learn.

Layout (ARCHITECTURE.md, "Performance model"): every tree is stored as a *complete* binary tree of
the forest's depth ``D``. Node ``i`` (0-based heap order) has children ``2i+1`` / ``2i+2``, so a walk
is index arithmetic with no child pointers and no branches: ``i = 2i + 1 + (x[f[i]] > t[i])``.
A leaf that sklearn placed above depth ``D`` is padded with pass-through nodes (threshold +inf:
always left) whose leaves all carry that leaf's path length.

Thresholds are float32, rounded *down* from sklearn's float64: for a float32 ``x``,
``x <= t64`` holds exactly when ``x <= floor32(t64)``, so comparisons stay bit-exact with sklearn,
which casts inputs to float32 too. Leaf values (path length incl. the ``c(n)`` correction) stay
float64 and are summed in tree order, as sklearn does.

The kernel walks a block of rows through one tree level by level: the rows' loads are independent,
so the CPU overlaps them instead of waiting on one dependent chain per record.

Explanations (``explain_serial`` / ``explain_parallel``, separate kernels: the scoring kernels are
untouched) attribute the path-length reduction of every split on a record's path to the split's
feature. With ``E(node) = level + c(n_node)`` (the expected path length of a record that reaches
the node; a leaf's ``E`` is its path length ``h``), going from node ``p`` to child ``q`` reduces the
expected path length by ``gain(q) = E(p) - E(q)``: large when the record falls into a small child
(the split isolates it), about ``+0.4`` for an even split and negative when it stays with the bulk.
Along a path the gains telescope to ``c(psi) - h_t(x)``, so a record's contributions, summed over
trees and divided by the denominator ``T * c(psi)``, sum to ``1 - E[h(x)] / c(psi) = 1 +
log2(score)``: an exact additive decomposition of the log-score (positive = pushes towards anomalous).
The sample counts ``n_node`` are recovered from the leaves' stored path lengths (see
:func:`split_gains`); the gains are computed once, on the first explanation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numba as nb
import numpy as np

from .backends import NumbaScorer
from .errors import ArtifactError
from .explain import mark_unexplained, select_top_k
from .preprocess import Preprocessing, prep_block

BLOCK = 64          # rows walked together through a tree; a float32 block stays in L1
FEW_ROWS = 4        # up to this many rows in a block, overlap trees instead of rows
TREE_GROUP = 8      # trees walked at once on the few-rows path
MAX_DEPTH = 24      # guards memory: 2**24 nodes per tree


def average_path_length(n: np.ndarray | float) -> np.ndarray:
    """``c(n)``: the average path length of an unsuccessful BST search among ``n`` points."""
    n = np.asarray(n, dtype=np.float64)
    out = np.zeros_like(n)
    two = n == 2
    big = n > 2
    out[two] = 1.0
    out[big] = 2.0 * (np.log(n[big] - 1.0) + np.euler_gamma) - 2.0 * (n[big] - 1.0) / n[big]
    return out


@dataclass(frozen=True)
class Forest:
    """A forest in the complete fixed-depth layout."""

    feature: np.ndarray     # (T, 2**D - 1) uint8 / uint16 / int32: split feature per internal node
    threshold: np.ndarray   # (T, 2**D - 1) float32: go right when x > threshold
    leaf_value: np.ndarray  # (T, 2**D) float64: depth + c(n_leaf) - 1
    denominator: float      # T * c(max_samples)

    @property
    def depth(self) -> int:
        return int(np.log2(self.leaf_value.shape[1]))

    @property
    def n_trees(self) -> int:
        return int(self.leaf_value.shape[0])

    def arrays(self) -> dict[str, np.ndarray]:
        return {
            "if_feature": self.feature,
            "if_threshold": self.threshold,
            "if_leaf_value": self.leaf_value,
            "if_denominator": np.array(self.denominator, dtype=np.float64),
        }

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], n_features: int) -> Forest:
        try:
            feature = np.ascontiguousarray(arrays["if_feature"])
            threshold = np.ascontiguousarray(arrays["if_threshold"], dtype=np.float32)
            leaf_value = np.ascontiguousarray(arrays["if_leaf_value"], dtype=np.float64)
            denominator = float(arrays["if_denominator"])
        except KeyError as e:
            raise ArtifactError(f"arrays.npz lacks Isolation Forest array {e}") from e
        if leaf_value.ndim != 2 or feature.ndim != 2 or threshold.shape != feature.shape:
            raise ArtifactError("Isolation Forest arrays have inconsistent shapes")
        n_trees, n_leaves = leaf_value.shape
        depth = int(np.log2(max(n_leaves, 1)))
        if n_trees < 1 or n_leaves != 2**depth or feature.shape != (n_trees, n_leaves - 1):
            raise ArtifactError("Isolation Forest arrays are not complete trees of one depth")
        if feature.dtype.kind not in "iu" or (feature.size and (feature.min() < 0 or feature.max() >= n_features)):
            raise ArtifactError(f"Isolation Forest split features must be integers in [0, {n_features})")
        if not np.all(np.isfinite(leaf_value)) or not np.isfinite(denominator):
            raise ArtifactError("Isolation Forest leaf values must be finite")
        return cls(feature, threshold, leaf_value, denominator)


def _feature_dtype(n_features: int) -> np.dtype:
    if n_features <= 256:
        return np.dtype(np.uint8)
    if n_features <= 65536:
        return np.dtype(np.uint16)
    return np.dtype(np.int32)


def _floor_float32(t: np.ndarray) -> np.ndarray:
    """Largest float32 <= t (elementwise), so that float32 comparisons match float64 ones."""
    t = np.asarray(t, dtype=np.float64)
    t32 = t.astype(np.float32)
    over = t32.astype(np.float64) > t
    t32[over] = np.nextafter(t32[over], np.float32(-np.inf))
    return t32


def build_forest(trees: list[dict[str, np.ndarray]], max_samples: int, n_features: int) -> Forest:
    """Lay out trees given as sklearn-style node arrays into the complete fixed-depth form.

    Each tree is a dict with ``children_left``, ``children_right`` (-1 at leaves), ``feature``
    (already mapped to the model's feature indices), ``threshold`` and ``n_node_samples``.
    """
    depths = []
    for tree in trees:
        left, right = tree["children_left"], tree["children_right"]
        node_depth = np.zeros(len(left), dtype=np.int64)
        stack = [0]
        while stack:
            i = stack.pop()
            if left[i] >= 0:
                node_depth[left[i]] = node_depth[right[i]] = node_depth[i] + 1
                stack += [left[i], right[i]]
        tree["_depth"] = node_depth
        depths.append(int(node_depth.max()))
    depth = max(max(depths), 1)
    if depth > MAX_DEPTH:
        raise ArtifactError(f"trees of depth {depth} exceed the supported {MAX_DEPTH}")
    n_int, n_leaf = 2**depth - 1, 2**depth
    T = len(trees)
    feature = np.zeros((T, n_int), dtype=_feature_dtype(n_features))
    threshold = np.full((T, n_int), np.inf, dtype=np.float32)
    leaf_value = np.zeros((T, n_leaf), dtype=np.float64)
    for t, tree in enumerate(trees):
        left, right = tree["children_left"], tree["children_right"]
        feat, thr = tree["feature"], _floor_float32(tree["threshold"])
        # path length as sklearn computes it: (depth in edges) + c(n) - 1 + 1, i.e. node depth
        # counted from 1 at the root, plus c(n), minus 1.0, in that order of operations.
        values = ((tree["_depth"] + 1).astype(np.float64) + average_path_length(tree["n_node_samples"])) - 1.0
        walk: list[tuple[int, int, int]] = [(0, 0, 0)]  # (sklearn node, complete-tree position, level)
        while walk:
            node, pos, level = walk.pop()
            if left[node] >= 0:
                feature[t, pos] = feat[node]
                threshold[t, pos] = thr[node]
                walk.append((left[node], 2 * pos + 1, level + 1))
                walk.append((right[node], 2 * pos + 2, level + 1))
            else:
                # pad: every leaf below `pos` carries this leaf's value; the internal nodes
                # between keep threshold +inf, so a walk always goes left through them.
                span = 2 ** (depth - level)
                first = pos
                for _ in range(depth - level):
                    first = 2 * first + 1
                leaf_value[t, first - n_int : first - n_int + span] = values[node]
    denominator = T * float(average_path_length(np.array([max_samples]))[0])
    return Forest(feature, threshold, leaf_value, denominator)


@nb.njit(nogil=True, cache=True)
def _score_rows(X, lo, hi, out, median, center, scale_inv, reject, feature, threshold, leaf_value, denominator, buf, idx, acc):
    """Score rows ``X[lo:hi]`` into ``out[lo:hi]``; returns the first rejected row or -1."""
    n_int = feature.shape[1]
    depth = 0
    while (1 << depth) - 1 < n_int:
        depth += 1
    for b0 in range(lo, hi, BLOCK):
        b1 = min(b0 + BLOCK, hi)
        m = b1 - b0
        bad = prep_block(X, b0, b1, median, center, scale_inv, reject, buf)
        if bad >= 0:
            return bad
        if m <= FEW_ROWS:
            _walk_tree_groups(buf, m, feature, threshold, leaf_value, depth, idx, acc)
        else:
            _walk_rows(buf, m, feature, threshold, leaf_value, depth, idx, acc)
        for r in range(m):
            out[b0 + r] = 2.0 ** (-acc[r] / denominator) if denominator != 0 else 1.0
    return -1


@nb.njit(nogil=True, cache=True, inline="always")
def _walk_rows(buf, m, feature, threshold, leaf_value, depth, idx, acc):
    """Many rows: walk all of them through one tree level by level (independent loads per row)."""
    n_trees, n_int = feature.shape
    for r in range(m):
        acc[r] = 0.0
    for t in range(n_trees):
        f_t = feature[t]
        t_t = threshold[t]
        for r in range(m):
            idx[r] = 0
        for _ in range(depth):
            for r in range(m):
                i = idx[r]
                idx[r] = 2 * i + 1 + (buf[r, f_t[i]] > t_t[i])
        lv = leaf_value[t]
        for r in range(m):
            acc[r] += lv[idx[r] - n_int]


@nb.njit(nogil=True, cache=True, inline="always")
def _walk_tree_groups(buf, m, feature, threshold, leaf_value, depth, idx, acc):
    """Few rows (latency path): walk TREE_GROUP trees of one row at once, so that independent
    load chains overlap even for a single record. Leaf values are still summed in tree order."""
    n_trees, n_int = feature.shape
    for r in range(m):
        s = 0.0
        for t0 in range(0, n_trees, TREE_GROUP):
            g1 = min(TREE_GROUP, n_trees - t0)
            for g in range(g1):
                idx[g] = 0
            for _ in range(depth):
                for g in range(g1):
                    i = idx[g]
                    idx[g] = 2 * i + 1 + (buf[r, feature[t0 + g, i]] > threshold[t0 + g, i])
            for g in range(g1):
                s += leaf_value[t0 + g, idx[g] - n_int]
        acc[r] = s


@nb.njit(nogil=True, cache=True)
def score_serial(X, out, median, center, scale_inv, reject, feature, threshold, leaf_value, denominator):
    """Lean single-threaded path for small batches (1-64 rows)."""
    d = X.shape[1]
    buf = np.empty((BLOCK, d), dtype=np.float32)
    idx = np.empty(BLOCK, dtype=np.uint32)
    acc = np.empty(BLOCK, dtype=np.float64)
    return _score_rows(X, 0, X.shape[0], out, median, center, scale_inv, reject, feature, threshold, leaf_value, denominator, buf, idx, acc)


@nb.njit(nogil=True, cache=True, parallel=True)
def score_parallel(X, out, median, center, scale_inv, reject, feature, threshold, leaf_value, denominator, n_threads):
    """Multi-threaded path: contiguous row chunks per task, per-task scratch buffers, no races."""
    n, d = X.shape
    n_blocks = (n + BLOCK - 1) // BLOCK
    n_tasks = max(1, min(n_blocks, n_threads * 4))
    bad = np.full(n_tasks, -1, dtype=np.int64)
    for task in nb.prange(n_tasks):
        buf = np.empty((BLOCK, d), dtype=np.float32)
        idx = np.empty(BLOCK, dtype=np.uint32)
        acc = np.empty(BLOCK, dtype=np.float64)
        lo = (task * n_blocks // n_tasks) * BLOCK
        hi = min(((task + 1) * n_blocks // n_tasks) * BLOCK, n)
        bad[task] = _score_rows(X, lo, hi, out, median, center, scale_inv, reject, feature, threshold, leaf_value, denominator, buf, idx, acc)
    for task in range(n_tasks):
        if bad[task] >= 0:
            return bad[task]
    return -1


# --------------------------------------------------------------------------- explanations


@nb.njit(nogil=True, cache=True)
def _c_of(n):
    """``c(n)`` for one count (the scalar twin of :func:`average_path_length`)."""
    if n > 2.0:
        return 2.0 * (np.log(n - 1.0) + np.euler_gamma) - 2.0 * (n - 1.0) / n
    if n == 2.0:
        return 1.0
    return 0.0


@nb.njit(nogil=True, cache=True)
def _count_of(c, c_table):
    """The sample count ``n`` whose ``c(n)`` (``c_table[n]``) is nearest to ``c``."""
    lo, hi = 1, c_table.shape[0] - 1
    while lo < hi:  # first n with c_table[n] >= c
        mid = (lo + hi) // 2
        if c_table[mid] < c:
            lo = mid + 1
        else:
            hi = mid
    if lo > 1 and c - c_table[lo - 1] < c_table[lo] - c:
        lo -= 1
    return float(lo)


@nb.njit(nogil=True, cache=True)
def _split_gains(threshold, leaf_value, c_table, gain):
    n_trees, n_int = threshold.shape
    n_nodes = 2 * n_int + 1
    kind = np.zeros(n_nodes, dtype=np.int8)  # 0: below a leaf (padding), 1: real split, 2: real leaf
    level = np.zeros(n_nodes, dtype=np.int64)
    for pos in range(1, n_nodes):
        level[pos] = level[(pos - 1) // 2] + 1
    depth = level[n_nodes - 1]
    count = np.zeros(n_nodes)
    expect = np.zeros(n_nodes)
    for t in range(n_trees):
        kind[:] = 0
        kind[0] = 1 if np.isfinite(threshold[t, 0]) else 2
        for pos in range(n_int):  # heap order: a parent before its children
            if kind[pos] == 1:
                for q in (2 * pos + 1, 2 * pos + 2):
                    kind[q] = 1 if q < n_int and np.isfinite(threshold[t, q]) else 2
        for pos in range(n_nodes - 1, -1, -1):  # children before parents
            if kind[pos] == 2:
                first = pos  # leftmost leaf slot below pos: it carries this leaf's path length
                for _ in range(depth - level[pos]):
                    first = 2 * first + 1
                h = leaf_value[t, first - n_int]
                expect[pos] = h
                count[pos] = _count_of(h - level[pos], c_table)
            elif kind[pos] == 1:
                count[pos] = count[2 * pos + 1] + count[2 * pos + 2]
                expect[pos] = level[pos] + _c_of(count[pos])
        for q in range(1, n_nodes):
            p = (q - 1) // 2
            gain[t, q - 1] = expect[p] - expect[q] if kind[p] == 1 else 0.0


def split_gains(forest: Forest) -> np.ndarray:
    """``(T, 2 * (2**D - 1))`` float64: ``gain[t, q - 1]`` is the path-length reduction of stepping
    into node ``q`` (0 below a leaf). A leaf's count ``n`` is recovered from its stored path length
    ``level + c(n)`` by inverting ``c`` over ``1..psi`` (``c`` is strictly increasing there and the
    stored value is exact to ~1e-15, far below the gaps ``c(n + 1) - c(n) ~ 2 / n``); an internal
    node's count is the sum of its leaves'."""
    n_trees = forest.n_trees
    gain = np.zeros((n_trees, 2 * forest.feature.shape[1]), dtype=np.float64)
    if forest.denominator <= 0:
        return gain  # psi <= 1: no information, every contribution 0
    target = forest.denominator / n_trees  # c(psi)
    top = 4
    while float(average_path_length(np.array([top]))[0]) < target + 1.0:
        top *= 2
    c_table = average_path_length(np.arange(top + 1, dtype=np.float64))
    _split_gains(np.ascontiguousarray(forest.threshold), np.ascontiguousarray(forest.leaf_value), c_table, gain)
    return gain


@nb.njit(nogil=True, cache=True)
def _attribute_pending(pbuf, npend, rows, feature, threshold, gain, depth, denominator, idx, cpend, feat, contrib):
    """Explain the ``npend`` preprocessed records in ``pbuf`` (output rows ``rows``): walk them
    through one tree at a time, level by level like ``_walk_rows``, each split adding its gain to
    ``cpend[r, feature]``. Batching the flagged records of many blocks loads each tree's tables
    once per batch instead of once per record (at a 1% alert rate a lone record's walk would miss
    the cache at every level). Per record, gains add up in tree order whatever the batch."""
    n_trees = feature.shape[0]
    d = cpend.shape[1]
    for r in range(npend):
        for j in range(d):
            cpend[r, j] = 0.0
    for t in range(n_trees):
        f_t = feature[t]
        t_t = threshold[t]
        g_t = gain[t]
        for r in range(npend):
            idx[r] = 0
        for _ in range(depth):
            for r in range(npend):
                i = idx[r]
                f = f_t[i]
                q = 2 * i + 1 + (pbuf[r, f] > t_t[i])
                cpend[r, f] += g_t[q - 1]  # 0 on padding nodes (below a leaf)
                idx[r] = q
    scale = 1.0 / denominator if denominator != 0 else 0.0
    for r in range(npend):
        c = cpend[r]
        for j in range(d):
            c[j] *= scale
        select_top_k(c, feat[rows[r]], contrib[rows[r]])


@nb.njit(nogil=True, cache=True)
def _explain_rows(X, lo, hi, out, feat, contrib, flag_threshold, flagged_only, median, center, scale_inv, reject,
                  feature, threshold, leaf_value, denominator, gain, buf, idx, acc, pbuf, rows, cpend):
    """Score rows ``X[lo:hi]`` exactly as ``_score_rows`` does; copy the preprocessed records to
    explain (all, or those with ``score >= flag_threshold``) from the block while it is in cache
    into a pending batch, explained whenever BLOCK records are pending and at the end."""
    n_int = feature.shape[1]
    d = X.shape[1]
    depth = 0
    while (1 << depth) - 1 < n_int:
        depth += 1
    npend = 0
    for b0 in range(lo, hi, BLOCK):
        b1 = min(b0 + BLOCK, hi)
        m = b1 - b0
        bad = prep_block(X, b0, b1, median, center, scale_inv, reject, buf)
        if bad >= 0:
            return bad
        if m <= FEW_ROWS:
            _walk_tree_groups(buf, m, feature, threshold, leaf_value, depth, idx, acc)
        else:
            _walk_rows(buf, m, feature, threshold, leaf_value, depth, idx, acc)
        for r in range(m):
            s = 2.0 ** (-acc[r] / denominator) if denominator != 0 else 1.0
            out[b0 + r] = s
            if flagged_only and not s >= flag_threshold:
                mark_unexplained(feat[b0 + r], contrib[b0 + r])
                continue
            for j in range(d):
                pbuf[npend, j] = buf[r, j]
            rows[npend] = b0 + r
            npend += 1
        if npend >= BLOCK or (npend > 0 and b1 == hi):
            # capacity 2 * BLOCK: fewer than BLOCK were pending before this block, which adds <= BLOCK
            _attribute_pending(pbuf, npend, rows, feature, threshold, gain, depth, denominator, idx, cpend, feat, contrib)
            npend = 0
    return -1


@nb.njit(nogil=True, cache=True)
def explain_serial(X, out, feat, contrib, flag_threshold, flagged_only, median, center, scale_inv, reject,
                   feature, threshold, leaf_value, denominator, gain):
    d = X.shape[1]
    buf = np.empty((BLOCK, d), dtype=np.float32)
    idx = np.empty(2 * BLOCK, dtype=np.uint32)
    acc = np.empty(BLOCK, dtype=np.float64)
    pbuf = np.empty((2 * BLOCK, d), dtype=np.float32)
    rows = np.empty(2 * BLOCK, dtype=np.int64)
    cpend = np.empty((2 * BLOCK, d), dtype=np.float64)
    return _explain_rows(X, 0, X.shape[0], out, feat, contrib, flag_threshold, flagged_only, median, center, scale_inv,
                         reject, feature, threshold, leaf_value, denominator, gain, buf, idx, acc, pbuf, rows, cpend)


@nb.njit(nogil=True, cache=True, parallel=True)
def explain_parallel(X, out, feat, contrib, flag_threshold, flagged_only, median, center, scale_inv, reject,
                     feature, threshold, leaf_value, denominator, gain, n_threads):
    """``score_parallel``'s row partition (same blocks, hence the same scores), per-task scratch."""
    n, d = X.shape
    n_blocks = (n + BLOCK - 1) // BLOCK
    n_tasks = max(1, min(n_blocks, n_threads * 4))
    bad = np.full(n_tasks, -1, dtype=np.int64)
    for task in nb.prange(n_tasks):
        buf = np.empty((BLOCK, d), dtype=np.float32)
        idx = np.empty(2 * BLOCK, dtype=np.uint32)
        acc = np.empty(BLOCK, dtype=np.float64)
        pbuf = np.empty((2 * BLOCK, d), dtype=np.float32)
        rows = np.empty(2 * BLOCK, dtype=np.int64)
        cpend = np.empty((2 * BLOCK, d), dtype=np.float64)
        lo = (task * n_blocks // n_tasks) * BLOCK
        hi = min(((task + 1) * n_blocks // n_tasks) * BLOCK, n)
        bad[task] = _explain_rows(X, lo, hi, out, feat, contrib, flag_threshold, flagged_only, median, center,
                                  scale_inv, reject, feature, threshold, leaf_value, denominator, gain, buf, idx, acc,
                                  pbuf, rows, cpend)
    for task in range(n_tasks):
        if bad[task] >= 0:
            return bad[task]
    return -1


def numba_scorer(forest: Forest, prep: Preprocessing) -> NumbaScorer:
    """The Numba scorer of ``forest`` (scoring and explanation kernels; the gains are computed on
    the first explanation)."""
    return NumbaScorer(score_serial, score_parallel, prep, (forest.feature, forest.threshold, forest.leaf_value, forest.denominator),
                       explain=(explain_serial, explain_parallel, lambda: (split_gains(forest),)))


def numba_explainer(forest: Forest, prep: Preprocessing) -> Callable[..., tuple[np.ndarray, np.ndarray]]:
    """``fn(X, top_k) -> (features, contributions)``: the ONNX and torch backends' explanations
    (their graphs have no per-split output), the Numba kernel on the same arrays."""
    return numba_scorer(forest, prep).top_k
