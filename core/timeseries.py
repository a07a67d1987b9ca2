"""A streaming detector for univariate time series: conformal k-nearest-neighbours (KNN-CAD,
Burnaev & Ishimtsev 2016, as entered in NAB), as a Numba kernel with fixed-size state.

Each point ``t`` is represented by its last ``dim`` values. Its non-conformity is the sum of its
``k`` smallest Mahalanobis distances (``sigma = inv(T^T T)`` of the training vectors ``T``, renewed
every half training period) to the ``P`` most recent training vectors; its score is the share of the
last ``P`` non-conformities below it (a conformal p-value, so scores are comparable across series:
higher = more anomalous, in [0, 1]). The first ``P`` points only fill the training set (score 0).
After a score of at least ``alert`` the detector stays quiet (score 0, learning nothing) for ``P //
5`` points: one alert per event. ``P``, ``dim``, ``k`` and ``alert`` default to the published
KNN-CAD values (P = the NAB probationary length, 19, 27, 0.9965); nothing here was tuned on NAB.

State: the training ring ``(P, dim)`` (kept transformed by ``sigma``'s Cholesky factor, so a
distance is a plain squared norm), the raw ring, the non-conformity ring ``(P,)``, the last ``dim``
values and counters: memory set by ``P`` and ``dim``, not by the stream's length.
"""

from __future__ import annotations

from dataclasses import dataclass

import numba as nb
import numpy as np

from .errors import InvalidInputError


@nb.njit(nogil=True, cache=True)
def _refresh(raw, n_train, L, dim):
    """New Cholesky factor of inv(T^T T); False (and L unchanged) when T^T T is singular."""
    A = raw[:n_train].T @ raw[:n_train]
    if not np.all(np.isfinite(A)) or abs(np.linalg.det(A)) < 1e-300:
        return False
    try:
        S = np.linalg.inv(A)
        S = 0.5 * (S + S.T)
        C = np.linalg.cholesky(S)
    except Exception:  # noqa: BLE001 (numba: LinAlgError)
        return False
    L[:, :] = C
    return True


@nb.njit(nogil=True, cache=True)
def _ncm(item_t, train_t, n_train, k, d, skip_self):
    for q in range(n_train):
        s = 0.0
        for j in range(item_t.shape[0]):
            e = train_t[q, j] - item_t[j]
            s += e * e
        d[q] = s
    part = np.sort(d[:n_train])
    m = min(k + skip_self, n_train)
    return part[:m].sum()


@nb.njit(nogil=True, cache=True)
def knncad_run(x, out, P, dim, k, alert, buf, raw, train_t, cal, L, ints):
    """Score-then-learn ``x`` in order. ``ints``: count, n_train, head, n_cal, cal_head, hold."""
    d = np.empty(P)
    item = np.empty(dim)
    for i in range(x.shape[0]):
        # shift the last-dim buffer
        for j in range(dim - 1):
            buf[j] = buf[j + 1]
        buf[dim - 1] = x[i]
        ints[0] += 1
        count = ints[0]
        out[i] = 0.0
        if count < dim:
            continue
        item[:] = buf
        if count < P:  # training only
            raw[ints[1]] = item
            ints[1] += 1
            continue
        ost = count % P
        if ost == 0 or ost == P // 2 or ints[3] == 0:
            if _refresh(raw, ints[1], L, dim):
                train_t[:ints[1]] = raw[:ints[1]] @ L
        item_t = item @ L
        if ints[3] == 0:  # the first calibration set: the training vectors against each other
            for q in range(ints[1]):
                cal[ints[3]] = _ncm(train_t[q], train_t, ints[1], k, d, 1)
                ints[3] += 1
        new = _ncm(item_t, train_t, ints[1], k, d, 0)
        below = 0
        for j in range(ints[3]):
            if cal[j] < new:
                below += 1
        res = below / ints[3]
        if ints[5] > 0:  # quiet after an alert
            ints[5] -= 1
            continue
        if res >= alert:
            ints[5] = P // 5
        out[i] = res
        # learn: the non-conformity and the vector replace the oldest
        if ints[3] < P:
            cal[ints[3]] = new
            ints[3] += 1
        else:
            cal[ints[4]] = new
            ints[4] = (ints[4] + 1) % P
        if ints[1] < P:
            raw[ints[1]] = item
            train_t[ints[1]] = item_t
            ints[1] += 1
        else:
            raw[ints[2]] = item
            train_t[ints[2]] = item_t
            ints[2] = (ints[2] + 1) % P


@dataclass
class KnnCad:
    """Conformal kNN anomaly detector for one univariate stream (see the module docstring)."""

    P: int
    dim: int
    k: int
    alert: float
    buf: np.ndarray
    raw: np.ndarray
    train_t: np.ndarray
    cal: np.ndarray
    L: np.ndarray
    ints: np.ndarray

    @classmethod
    def new(cls, P: int = 750, dim: int = 19, k: int = 27, alert: float = 0.9965) -> KnnCad:
        if dim < 1 or k < 1 or P <= max(dim, k) + 1:
            raise InvalidInputError(f"KnnCad needs dim >= 1, k >= 1 and P > max(dim, k) + 1; got P={P}, dim={dim}, k={k}")
        return cls(int(P), int(dim), int(k), float(alert), np.zeros(dim), np.zeros((P, dim)), np.zeros((P, dim)),
                   np.zeros(P), np.eye(dim), np.zeros(6, np.int64))

    @property
    def position(self) -> int:
        return int(self.ints[0])

    def score_update(self, x: np.ndarray) -> np.ndarray:
        """Score each value of the 1-D ``x`` against the state before it, then learn it."""
        x = np.ascontiguousarray(x, dtype=np.float64)
        if x.ndim != 1 or not np.all(np.isfinite(x)):
            raise InvalidInputError(f"x must be a 1-D array of finite values; got shape {x.shape}")
        out = np.zeros(x.shape[0])
        knncad_run(x, out, self.P, self.dim, self.k, self.alert, self.buf, self.raw, self.train_t, self.cal, self.L, self.ints)
        return out

    def arrays(self) -> dict[str, np.ndarray]:
        return {"kc_buf": self.buf, "kc_raw": self.raw, "kc_train_t": self.train_t, "kc_cal": self.cal, "kc_L": self.L,
                "kc_ints": self.ints, "kc_params": np.array([self.P, self.dim, self.k], np.int64),
                "kc_alert": np.array([self.alert])}

    @classmethod
    def from_arrays(cls, a: dict[str, np.ndarray]) -> KnnCad:
        P, dim, k = (int(v) for v in a["kc_params"])
        return cls(P, dim, k, float(a["kc_alert"][0]), *(np.array(a[f"kc_{n}"]) for n in ("buf", "raw", "train_t", "cal", "L", "ints")))
