"""k-nearest-neighbour detectors against a stored reference sample: ``knn`` and ``lof``.

The artifact stores a reference sample ``R`` (``m`` preprocessed training records, float64; chosen
at training as a seeded random sample of ``min(n, 4096)`` rows) and ``k``. Distances are Euclidean
on preprocessed records. Higher = more anomalous for both:

- ``knn``: the distance from ``x`` to its k-th nearest reference record (a reference record equal
  to ``x`` counts, at distance 0).
- ``lof``: the local outlier factor of ``x`` against ``R`` with scikit-learn's definitions, i.e.
  ``-LocalOutlierFactor(n_neighbors=k, novelty=True).fit(R).score_samples(x)``. With ``N_k(x)``
  the k nearest reference records of ``x``, ``kdist[i]`` the distance from ``R[i]`` to its own
  k-th nearest *other* reference record, ``reach(x, i) = max(d(x, R[i]), kdist[i])`` and
  ``lrd[i] = 1 / (mean_{o in N_k(R[i])} reach(R[i], o) + 1e-10)`` (both precomputed at training
  and stored): ``lof(x) = mean_{i in N_k(x)} lrd[i] * (mean_{i in N_k(x)} reach(x, i) + 1e-10)``.

Ties (equal distances) are broken by the lower reference index, on every backend.

Explanations (Numba kernels ``explain_serial`` / ``explain_parallel``, beside the scoring ones):
feature ``j`` contributes ``mean_{i in N_k(x)} (x_j - R[i, j])**2``, the squared per-feature
difference to the record's k nearest reference records (the same neighbours the score uses), so a
record's contributions sum to its mean squared distance to them. The torch backend's scores come
from torch; its explanations from this kernel on the same arrays.

Backends: ``numba`` (CPU): a blocked kernel, preprocessing fused; a block of query rows passes over
the reference in blocks, every row keeping a sorted top-k insertion buffer of squared distances.
``torch`` (CPU or CUDA): GEMM distances ``|q|^2 + |r|^2 - 2 q.r`` pick ``k + 8`` candidates per row
with ``topk``; the candidates' distances are then recomputed exactly from differences, so the
scores equal the Numba kernel's (float64 throughout) and not the cancellation-prone GEMM values.
"""

from __future__ import annotations

from dataclasses import dataclass

import numba as nb
import numpy as np

from .backends import ArrayScorer, NumbaScorer, import_torch, register
from .errors import ArtifactError, InvalidInputError
from .explain import mark_unexplained, select_top_k
from .preprocess import prep_block

BLOCK = 64          # query rows per block
REF_BLOCK = 256     # reference rows a query block passes over at a time (stay in L1/L2)
KINDS = ("knn", "lof")
LOF_EPS = 1e-10     # scikit-learn's guard in the local reachability density
MAX_REFERENCE = 4096
DEFAULT_K = 20
CANDIDATE_MARGIN = 8          # torch path: extra GEMM candidates re-ranked by exact distance
CHUNK_ELEMENTS = 1 << 22      # torch path: query rows per chunk x reference rows (32 MiB of float64)


@dataclass(frozen=True)
class Neighbors:
    kind: str
    ref: np.ndarray    # (m, d) float64, preprocessed reference records
    k: int
    kdist: np.ndarray  # (m,) float64: lof only (empty for knn)
    lrd: np.ndarray    # (m,) float64: lof only (empty for knn)

    def arrays(self) -> dict[str, np.ndarray]:
        out = {"nn_ref": self.ref}
        if self.kind == "lof":
            out.update(nn_kdist=self.kdist, nn_lrd=self.lrd)
        return out

    @classmethod
    def from_arrays(cls, kind: str, arrays: dict[str, np.ndarray], n_features: int, k: int) -> Neighbors:
        if kind not in KINDS:
            raise ArtifactError(f"unknown neighbour detector {kind!r}")
        try:
            ref = np.ascontiguousarray(arrays["nn_ref"], dtype=np.float64)
            if kind == "lof":
                kdist = np.ascontiguousarray(arrays["nn_kdist"], dtype=np.float64)
                lrd = np.ascontiguousarray(arrays["nn_lrd"], dtype=np.float64)
            else:
                kdist = lrd = np.empty(0, dtype=np.float64)
        except KeyError as e:
            raise ArtifactError(f"arrays.npz lacks {kind} array {e}") from e
        if ref.ndim != 2 or ref.shape[1] != n_features or ref.shape[0] < 1:
            raise ArtifactError(f"{kind} reference sample must have shape (m >= 1, {n_features}); got {ref.shape}")
        m = ref.shape[0]
        if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or not 1 <= k <= m:
            raise ArtifactError(f"{kind} k must be an integer in [1, {m}] (the reference size); got {k!r}")
        if kind == "lof" and (kdist.shape != (m,) or lrd.shape != (m,) or m < 2):
            raise ArtifactError(f"lof arrays must hold {m} k-distances and densities, and at least 2 reference records")
        if not (np.all(np.isfinite(ref)) and np.all(np.isfinite(kdist)) and np.all(np.isfinite(lrd))):
            raise ArtifactError(f"{kind} arrays must be finite")
        if np.any(kdist < 0) or np.any(lrd <= 0):
            raise ArtifactError("lof k-distances must be >= 0 and densities > 0")
        return cls(kind, ref, int(k), kdist, lrd)


# --------------------------------------------------------------------------- Numba (CPU)

@nb.njit(nogil=True, cache=True)
def _topk_block(buf, nq, ref, k, topd, topi, self0):
    """For rows ``buf[:nq]``: the k smallest squared distances to ``ref`` rows, ascending, with
    their indices (ties: lower index first). ``self0 >= 0`` skips ``ref[self0 + r]`` for row r."""
    m, d = ref.shape
    for r in range(nq):
        for p in range(k):
            topd[r, p] = np.inf
            topi[r, p] = -1
    for c0 in range(0, m, REF_BLOCK):
        c1 = min(c0 + REF_BLOCK, m)
        for r in range(nq):
            worst = topd[r, k - 1]
            skip = self0 + r if self0 >= 0 else -1
            for c in range(c0, c1):
                if c == skip:
                    continue
                s = 0.0
                for j in range(d):
                    t = buf[r, j] - ref[c, j]
                    s += t * t
                if s < worst:
                    p = k - 1
                    while p > 0 and topd[r, p - 1] > s:
                        topd[r, p] = topd[r, p - 1]
                        topi[r, p] = topi[r, p - 1]
                        p -= 1
                    topd[r, p] = s
                    topi[r, p] = c
                    worst = topd[r, k - 1]


@nb.njit(nogil=True, cache=True)
def _score_rows(X, lo, hi, out, median, center, scale_inv, reject, ref, k, use_lof, kdist, lrd, buf, topd, topi):
    for b0 in range(lo, hi, BLOCK):
        b1 = min(b0 + BLOCK, hi)
        bad = prep_block(X, b0, b1, median, center, scale_inv, reject, buf)
        if bad >= 0:
            return bad
        nq = b1 - b0
        _topk_block(buf, nq, ref, k, topd, topi, -1)
        for r in range(nq):
            if use_lof:
                reach = 0.0
                dens = 0.0
                for p in range(k):
                    i = topi[r, p]
                    reach += max(np.sqrt(topd[r, p]), kdist[i])
                    dens += lrd[i]
                out[b0 + r] = (dens / k) * (reach / k + LOF_EPS)
            else:
                out[b0 + r] = np.sqrt(topd[r, k - 1])
    return -1


@nb.njit(nogil=True, cache=True)
def score_serial(X, out, median, center, scale_inv, reject, ref, k, use_lof, kdist, lrd):
    d = X.shape[1]
    buf = np.empty((BLOCK, d), dtype=np.float64)
    topd = np.empty((BLOCK, k), dtype=np.float64)
    topi = np.empty((BLOCK, k), dtype=np.int64)
    return _score_rows(X, 0, X.shape[0], out, median, center, scale_inv, reject, ref, k, use_lof, kdist, lrd, buf, topd, topi)


@nb.njit(nogil=True, cache=True, parallel=True)
def score_parallel(X, out, median, center, scale_inv, reject, ref, k, use_lof, kdist, lrd, n_threads):
    n, d = X.shape
    n_blocks = (n + BLOCK - 1) // BLOCK
    n_tasks = max(1, min(n_blocks, n_threads * 4))
    bad = np.full(n_tasks, -1, dtype=np.int64)
    for task in nb.prange(n_tasks):
        buf = np.empty((BLOCK, d), dtype=np.float64)
        topd = np.empty((BLOCK, k), dtype=np.float64)
        topi = np.empty((BLOCK, k), dtype=np.int64)
        lo = (task * n_blocks // n_tasks) * BLOCK
        hi = min(((task + 1) * n_blocks // n_tasks) * BLOCK, n)
        bad[task] = _score_rows(X, lo, hi, out, median, center, scale_inv, reject, ref, k, use_lof, kdist, lrd, buf, topd, topi)
    for task in range(n_tasks):
        if bad[task] >= 0:
            return bad[task]
    return -1


@nb.njit(nogil=True, cache=True, parallel=True)
def _self_neighbors(ref, k, dist, idx):
    m, d = ref.shape
    n_blocks = (m + BLOCK - 1) // BLOCK
    for b in nb.prange(n_blocks):
        b0 = b * BLOCK
        b1 = min(b0 + BLOCK, m)
        buf = np.empty((BLOCK, d), dtype=np.float64)
        topd = np.empty((BLOCK, k), dtype=np.float64)
        topi = np.empty((BLOCK, k), dtype=np.int64)
        for r in range(b1 - b0):
            for j in range(d):
                buf[r, j] = ref[b0 + r, j]
        _topk_block(buf, b1 - b0, ref, k, topd, topi, b0)
        for r in range(b1 - b0):
            for p in range(k):
                dist[b0 + r, p] = np.sqrt(topd[r, p])
                idx[b0 + r, p] = topi[r, p]


def reference_neighbors(ref: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each reference record's k nearest *other* reference records: distances ``(m, k)``
    ascending and indices ``(m, k)`` (what scikit-learn's ``kneighbors()`` without ``X`` gives)."""
    ref = np.ascontiguousarray(ref, dtype=np.float64)
    m = ref.shape[0]
    if not 1 <= k <= m - 1:
        raise InvalidInputError(f"k must be in [1, {m - 1}] for {m} reference records; got {k}")
    dist = np.empty((m, k), dtype=np.float64)
    idx = np.empty((m, k), dtype=np.int64)
    _self_neighbors(ref, k, dist, idx)
    return dist, idx


def lof_tables(ref: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``(kdist, lrd)`` of the reference records, as scikit-learn's ``LocalOutlierFactor.fit``."""
    dist, idx = reference_neighbors(ref, k)
    kdist = dist[:, k - 1].copy()
    reach = np.maximum(dist, kdist[idx])
    lrd = 1.0 / (reach.mean(axis=1) + LOF_EPS)
    return kdist, lrd


def _neighbors(detector: dict, arrays: dict, d: int) -> Neighbors:
    params = detector.get("params", {})
    if "k" not in params:
        raise ArtifactError(f"the {detector['kind']} detector's params lack k")
    return Neighbors.from_arrays(detector["kind"], arrays, d, params["k"])


@nb.njit(nogil=True, cache=True)
def _explain_rows(X, lo, hi, out, feat, contrib, flag_threshold, flagged_only, median, center, scale_inv, reject,
                  ref, k, use_lof, kdist, lrd, buf, topd, topi, c):
    """``_score_rows``' scores (same neighbours, same operations), then the per-feature squared
    differences to those neighbours for the rows to explain."""
    d = X.shape[1]
    for b0 in range(lo, hi, BLOCK):
        b1 = min(b0 + BLOCK, hi)
        bad = prep_block(X, b0, b1, median, center, scale_inv, reject, buf)
        if bad >= 0:
            return bad
        nq = b1 - b0
        _topk_block(buf, nq, ref, k, topd, topi, -1)
        for r in range(nq):
            if use_lof:
                reach = 0.0
                dens = 0.0
                for p in range(k):
                    i = topi[r, p]
                    reach += max(np.sqrt(topd[r, p]), kdist[i])
                    dens += lrd[i]
                s = (dens / k) * (reach / k + LOF_EPS)
            else:
                s = np.sqrt(topd[r, k - 1])
            out[b0 + r] = s
            if flagged_only and not s >= flag_threshold:
                mark_unexplained(feat[b0 + r], contrib[b0 + r])
                continue
            for j in range(d):
                c[j] = 0.0
            for p in range(k):
                i = topi[r, p]
                for j in range(d):
                    t = buf[r, j] - ref[i, j]
                    c[j] += t * t
            for j in range(d):
                c[j] /= k
            select_top_k(c, feat[b0 + r], contrib[b0 + r])
    return -1


@nb.njit(nogil=True, cache=True)
def explain_serial(X, out, feat, contrib, flag_threshold, flagged_only, median, center, scale_inv, reject,
                   ref, k, use_lof, kdist, lrd):
    d = X.shape[1]
    buf = np.empty((BLOCK, d), dtype=np.float64)
    topd = np.empty((BLOCK, k), dtype=np.float64)
    topi = np.empty((BLOCK, k), dtype=np.int64)
    c = np.empty(d, dtype=np.float64)
    return _explain_rows(X, 0, X.shape[0], out, feat, contrib, flag_threshold, flagged_only, median, center, scale_inv,
                         reject, ref, k, use_lof, kdist, lrd, buf, topd, topi, c)


@nb.njit(nogil=True, cache=True, parallel=True)
def explain_parallel(X, out, feat, contrib, flag_threshold, flagged_only, median, center, scale_inv, reject,
                     ref, k, use_lof, kdist, lrd, n_threads):
    n, d = X.shape
    n_blocks = (n + BLOCK - 1) // BLOCK
    n_tasks = max(1, min(n_blocks, n_threads * 4))
    bad = np.full(n_tasks, -1, dtype=np.int64)
    for task in nb.prange(n_tasks):
        buf = np.empty((BLOCK, d), dtype=np.float64)
        topd = np.empty((BLOCK, k), dtype=np.float64)
        topi = np.empty((BLOCK, k), dtype=np.int64)
        c = np.empty(d, dtype=np.float64)
        lo = (task * n_blocks // n_tasks) * BLOCK
        hi = min(((task + 1) * n_blocks // n_tasks) * BLOCK, n)
        bad[task] = _explain_rows(X, lo, hi, out, feat, contrib, flag_threshold, flagged_only, median, center,
                                  scale_inv, reject, ref, k, use_lof, kdist, lrd, buf, topd, topi, c)
    for task in range(n_tasks):
        if bad[task] >= 0:
            return bad[task]
    return -1


def _numba_scorer(nn: Neighbors, prep) -> NumbaScorer:
    return NumbaScorer(score_serial, score_parallel, prep, (nn.ref, nn.k, nn.kind == "lof", nn.kdist, nn.lrd),
                       explain=(explain_serial, explain_parallel, ()))


@register("knn", "numba")
@register("lof", "numba")
def _neighbors_numba(detector, arrays, d, prep, device, files):
    return _numba_scorer(_neighbors(detector, arrays, d), prep)


# --------------------------------------------------------------------------- torch (CPU or CUDA)

class TorchNeighbors:
    """``fn(float64 (n, d) preprocessed) -> float64 (n,)``: GEMM candidates, exact re-ranking."""

    def __init__(self, nn: Neighbors, device: str = "cpu", chunk_elements: int | None = None):
        import torch

        self.torch = torch
        self.device = torch.device("cuda" if device == "cuda" else "cpu")
        self.kind, self.k = nn.kind, nn.k
        self.ref = torch.from_numpy(nn.ref).to(self.device)
        self.ref_sq = (self.ref * self.ref).sum(dim=1)
        self.kdist = torch.from_numpy(nn.kdist).to(self.device)
        self.lrd = torch.from_numpy(nn.lrd).to(self.device)
        m = nn.ref.shape[0]
        self.n_cand = min(m, nn.k + CANDIDATE_MARGIN)
        self.chunk = max(1, (CHUNK_ELEMENTS if chunk_elements is None else chunk_elements) // m)

    def _chunk(self, q):
        torch = self.torch
        d2 = (q * q).sum(dim=1, keepdim=True) + self.ref_sq[None, :] - 2.0 * (q @ self.ref.T)
        cand = torch.topk(d2, self.n_cand, dim=1, largest=False, sorted=False).indices
        cand, _ = torch.sort(cand, dim=1)  # by index, so that the stable sort below breaks ties by index
        diff = q[:, None, :] - self.ref[cand]
        exact = (diff * diff).sum(dim=2)
        sq, order = torch.sort(exact, dim=1, stable=True)
        dist = torch.sqrt(sq[:, : self.k])
        if self.kind == "knn":
            return dist[:, self.k - 1]
        nbr = torch.gather(cand, 1, order[:, : self.k])
        reach = torch.maximum(dist, self.kdist[nbr]).sum(dim=1) / self.k
        return (self.lrd[nbr].sum(dim=1) / self.k) * (reach + LOF_EPS)

    def __call__(self, X: np.ndarray) -> np.ndarray:
        torch = self.torch
        out = np.empty(X.shape[0], dtype=np.float64)
        with torch.no_grad():
            for lo in range(0, X.shape[0], self.chunk):
                hi = min(lo + self.chunk, X.shape[0])
                q = torch.from_numpy(np.ascontiguousarray(X[lo:hi], dtype=np.float64)).to(self.device)
                out[lo:hi] = self._chunk(q).cpu().numpy()
        return out


@register("knn", "torch")
@register("lof", "torch")
def _neighbors_torch(detector, arrays, d, prep, device, files):
    import_torch(device)
    nn = _neighbors(detector, arrays, d)
    # float64 records: the neighbour scores must reproduce the training-time probe exactly;
    # explanations: the Numba kernel on the same arrays (see the module docstring)
    return ArrayScorer(TorchNeighbors(nn, device), prep, "torch", device, dtype=np.float64,
                       explain_fn=_numba_scorer(nn, prep).top_k)
