"""RS-Hash (Sathe & Aggarwal 2016, "Subspace Outlier Detection in Linear Time with Randomized
Hashing"), streaming, as Numba kernels: a projection-based detector that learns as it scores.

Each of ``m`` components draws a random subspace of features, a grid cell width ``f`` and random
shifts; a record (min-max scaled by the running extremes, as in the paper) falls into one grid cell
per component, hashed into ``w`` count-min rows of ``n_buckets``. A record's density in a component
is the smallest of its ``w`` counts in the last complete window of ``window_size`` records (the
reference; the latest window is counted meanwhile and becomes the reference when full: two
fixed-size tables, as Half-Space Trees do). Score, **higher = more anomalous**:
``-mean over components of log2(count + 1)``; the first window scores 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numba as nb
import numpy as np

from .errors import ArtifactError, InvalidInputError

_MIX = np.uint64(0x9E3779B97F4A7C15)


@nb.njit(nogil=True, cache=True, inline="always")
def _cells(x, lo, hi, dims, alpha, f, c, cell):
    d = x.shape[0]
    for j in range(d):
        cell[j] = -1
    for q in range(dims.shape[1]):
        j = dims[c, q]
        if j < 0:
            break
        g = hi[j] - lo[j]
        v = (x[j] - lo[j]) / g if g > 0.0 else 0.0
        cell[j] = np.int64(np.floor((v + alpha[c, j]) / f[c]))


@nb.njit(nogil=True, cache=True, inline="always")
def _bucket(cell, mult, c, r, n_buckets):
    h = np.uint64(c * 131 + r)
    for j in range(cell.shape[0]):
        h = (h ^ np.uint64(cell[j] + 2)) * mult[r]
        h ^= h >> np.uint64(29)
    return np.int64(h % np.uint64(n_buckets))


@nb.njit(nogil=True, cache=True)
def _run(X, do_score, do_learn, pos0, window, lo, hi, dims, alpha, f, mult, ref, cur, out):
    n, d = X.shape
    m, w, B = ref.shape
    cell = np.empty(d, np.int64)
    for i in range(n):
        x = X[i]
        p = pos0 + i if do_learn else pos0
        if do_score:
            if p < window:
                out[i] = 0.0
            else:
                s = 0.0
                for c in range(m):
                    _cells(x, lo, hi, dims, alpha, f, c, cell)
                    cnt = np.int64(1) << 62
                    for r in range(w):
                        cnt = min(cnt, ref[c, r, _bucket(cell, mult, c, r, B)])
                    s += np.log2(cnt + 1.0)
                out[i] = -s / m
        if do_learn:
            for j in range(d):
                if x[j] < lo[j]:
                    lo[j] = x[j]
                if x[j] > hi[j]:
                    hi[j] = x[j]
            for c in range(m):
                _cells(x, lo, hi, dims, alpha, f, c, cell)
                for r in range(w):
                    cur[c, r, _bucket(cell, mult, c, r, B)] += 1
            if (p + 1) % window == 0:  # the latest window becomes the reference
                ref[:, :, :] = cur
                cur[:, :, :] = 0


@dataclass
class RSHash:
    """Streaming RS-Hash with state (see the module docstring)."""

    dims: np.ndarray  # (m, max_s) int64 feature indices of each component's subspace, -1 padded
    alpha: np.ndarray  # (m, d) shifts
    f: np.ndarray  # (m,) cell widths
    mult: np.ndarray  # (w,) uint64 odd multipliers of the hash rows
    window_size: int
    ref: np.ndarray  # (m, w, n_buckets) int64 counts of the last complete window
    cur: np.ndarray  # (m, w, n_buckets) counts of the window in progress
    lo: np.ndarray
    hi: np.ndarray
    position: int = 0

    @classmethod
    def new(cls, n_features: int, n_components: int = 100, n_rows: int = 2, n_buckets: int = 1024,
            window_size: int = 256, seed: int = 0) -> RSHash:
        if n_features < 1 or n_components < 1 or n_rows < 1 or n_buckets < 1 or window_size < 2:
            raise InvalidInputError("RSHash needs n_features, n_components, n_rows, n_buckets >= 1 and window_size >= 2")
        rng = np.random.default_rng(seed)
        N = window_size
        # the paper: f in (1/sqrt(N), 1 - 1/sqrt(N)); subspace size in [1 + 0.5 log_max(2, 1/f) N, log_max(2, 1/f) N]
        f = rng.uniform(1.0 / np.sqrt(N), 1.0 - 1.0 / np.sqrt(N), n_components)
        dims = np.full((n_components, n_features), -1, np.int64)
        for c in range(n_components):
            base = np.log(N) / np.log(max(2.0, 1.0 / f[c]))
            lo_s, hi_s = 1 + 0.5 * base, base
            s = int(np.clip(rng.integers(int(np.floor(lo_s)), int(np.ceil(hi_s)) + 1), 1, n_features))
            dims[c, :s] = np.sort(rng.choice(n_features, s, replace=False))
        alpha = rng.uniform(0.0, f[:, None], (n_components, n_features))
        mult = (rng.integers(1, 1 << 62, n_rows, dtype=np.int64).astype(np.uint64) * np.uint64(2) + np.uint64(1)) ^ _MIX
        mult |= np.uint64(1)
        z = np.zeros((n_components, n_rows, n_buckets), np.int64)
        return cls(dims, alpha, f, mult, int(window_size), z, z.copy(), np.full(n_features, np.inf),
                   np.full(n_features, -np.inf))

    def _go(self, X: np.ndarray, do_score: bool, do_learn: bool) -> np.ndarray:
        X = np.ascontiguousarray(X, dtype=np.float64)
        if X.ndim != 2 or X.shape[1] != self.lo.size:
            raise InvalidInputError(f"X must be (n_records, {self.lo.size}); got shape {X.shape}")
        if not np.all(np.isfinite(X)):
            raise InvalidInputError("RS-Hash needs finite values (impute them first)")
        out = np.zeros(X.shape[0])
        _run(X, do_score, do_learn, self.position, self.window_size, self.lo, self.hi, self.dims, self.alpha, self.f,
             self.mult, self.ref, self.cur, out)
        if do_learn:
            self.position += X.shape[0]
        return out

    def score(self, X: np.ndarray, parallel: bool | None = None) -> np.ndarray:
        return self._go(X, True, False)

    def update(self, X: np.ndarray, parallel: bool | None = None) -> None:
        self._go(X, False, True)

    def score_update(self, X: np.ndarray, parallel: bool | None = None) -> np.ndarray:
        return self._go(X, True, True)

    def arrays(self) -> dict[str, np.ndarray]:
        return {"rs_dims": self.dims, "rs_alpha": self.alpha, "rs_f": self.f, "rs_mult": self.mult, "rs_ref": self.ref,
                "rs_cur": self.cur, "rs_lo": self.lo, "rs_hi": self.hi, "rs_position": np.array([self.position], np.int64)}

    def params(self) -> dict[str, Any]:
        m, w, B = self.ref.shape
        return {"n_components": m, "n_rows": w, "n_buckets": B, "window_size": self.window_size}

    @classmethod
    def from_arrays(cls, a: dict[str, np.ndarray], n_features: int, params: dict[str, Any]) -> RSHash:
        try:
            m = cls(np.array(a["rs_dims"], np.int64), np.array(a["rs_alpha"], np.float64), np.array(a["rs_f"], np.float64),
                    np.array(a["rs_mult"], np.uint64), int(params["window_size"]), np.array(a["rs_ref"], np.int64),
                    np.array(a["rs_cur"], np.int64), np.array(a["rs_lo"], np.float64), np.array(a["rs_hi"], np.float64),
                    int(a["rs_position"][0]))
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise ArtifactError(f"RS-Hash state lacks or garbles {e}") from e
        c = m.dims.shape[0]
        if (m.dims.shape != (c, n_features) or m.alpha.shape != (c, n_features) or m.f.shape != (c,) or m.ref.ndim != 3
                or m.ref.shape[0] != c or m.cur.shape != m.ref.shape or m.mult.shape != (m.ref.shape[1],)
                or m.lo.shape != (n_features,) or m.dims.max() >= n_features):
            raise ArtifactError(f"RS-Hash state arrays are inconsistent with {n_features} features")
        return m
