"""A streaming detector for univariate time series: conformal k-nearest-neighbours (KNN-CAD,
Burnaev & Ishimtsev 2016, as entered in NAB), as a Numba kernel with fixed-size state.

Each point ``t`` is represented by its last ``dim`` values. Its non-conformity is the sum of its
``k`` smallest Mahalanobis distances (``sigma = inv(T^T T)`` of the training vectors ``T``, renewed
every half training period) to the training vectors; its score is the share of the last ``P - dim``
non-conformities below it (a conformal p-value, so scores are comparable across series: higher =
more anomalous, in [0, 1]). The first ``P`` points only fill the training set (score 0). New vectors
wait in a queue of ``P`` before they replace the oldest training vector, so a point is never judged
against its own recent past (a lasting change keeps its high scores for a while). After a score of
at least ``alert`` the detector reports a neutral 0.5 for ``P // 5`` points: one alert per event. ``P``, ``dim``, ``k`` and ``alert`` default to the published
KNN-CAD values (P = the NAB probationary length, 19, 27, 0.9965); nothing here was tuned on NAB.

State: the training ring ``(P - dim, dim)`` (also kept transformed by ``sigma``'s Cholesky factor,
so a distance is a plain squared norm), the queue ``(P + 1, dim)``, the non-conformity ring, the
last ``dim`` values and counters: memory set by ``P`` and ``dim``, not by the stream's length.
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
def knncad_run(x, out, P, dim, k, alert, buf, raw, train_t, calq, cal, L, ints):
    """Score-then-learn ``x`` in order. ``ints``: count, n_train, train_head, calq_head, calq_n,
    cal_n, cal_head, hold. Training vectors ``raw`` (ring of ``P - dim``), the queue of newer vectors
    waiting to enter it ``calq`` (ring of ``P + 1``), non-conformities ``cal`` (ring of ``P - dim``)."""
    NT = raw.shape[0]
    QN = calq.shape[0]
    d = np.empty(NT)
    item = np.empty(dim)
    for i in range(x.shape[0]):
        for j in range(dim - 1):
            buf[j] = buf[j + 1]
        buf[dim - 1] = x[i]
        ints[0] += 1
        count = ints[0]
        out[i] = 0.0
        if count < dim:
            continue
        item[:] = buf
        if count < P:  # the training period
            raw[ints[1]] = item
            ints[1] += 1
            continue
        n_train = ints[1]
        ost = count % P
        if ost == 0 or ost == P // 2:
            if _refresh(raw, n_train, L, dim):
                train_t[:n_train] = raw[:n_train] @ L
        if ints[5] == 0:  # the first non-conformities: the training vectors against each other
            for q in range(n_train):
                cal[q] = _ncm(train_t[q], train_t, n_train, k, d, 1)
            ints[5] = n_train
        new = _ncm(item @ L, train_t, n_train, k, d, 0)
        below = 0
        for j in range(ints[5]):
            if cal[j] < new:
                below += 1
        res = below / ints[5]
        if count >= 2 * P:  # the oldest queued vector replaces the oldest training one
            qi = ints[3]
            h = ints[2]
            raw[h] = calq[qi]
            train_t[h] = calq[qi] @ L
            ints[2] = (h + 1) % n_train
            ints[3] = (qi + 1) % QN
            ints[4] -= 1
        cal[ints[6]] = new  # the oldest non-conformity gives way
        ints[6] = (ints[6] + 1) % ints[5]
        calq[(ints[3] + ints[4]) % QN] = item
        ints[4] += 1
        if ints[7] > 0:  # one alert per event: a neutral score for P // 5 points after one
            ints[7] -= 1
            out[i] = 0.5
            continue
        if res >= alert:
            ints[7] = P // 5
        out[i] = res


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
    calq: np.ndarray
    cal: np.ndarray
    L: np.ndarray
    ints: np.ndarray

    @classmethod
    def new(cls, P: int = 750, dim: int = 19, k: int = 27, alert: float = 0.9965) -> KnnCad:
        if dim < 1 or k < 1 or P <= dim + k + 1:
            raise InvalidInputError(f"KnnCad needs dim >= 1, k >= 1 and P > dim + k + 1; got P={P}, dim={dim}, k={k}")
        nt = P - dim
        return cls(int(P), int(dim), int(k), float(alert), np.zeros(dim), np.zeros((nt, dim)), np.zeros((nt, dim)),
                   np.zeros((P + 1, dim)), np.zeros(nt), np.eye(dim), np.zeros(8, np.int64))

    @property
    def position(self) -> int:
        return int(self.ints[0])

    def score_update(self, x: np.ndarray) -> np.ndarray:
        """Score each value of the 1-D ``x`` against the state before it, then learn it."""
        x = np.ascontiguousarray(x, dtype=np.float64)
        if x.ndim != 1 or not np.all(np.isfinite(x)):
            raise InvalidInputError(f"x must be a 1-D array of finite values; got shape {x.shape}")
        out = np.zeros(x.shape[0])
        knncad_run(x, out, self.P, self.dim, self.k, self.alert, self.buf, self.raw, self.train_t, self.calq, self.cal, self.L,
                   self.ints)
        return out

    def arrays(self) -> dict[str, np.ndarray]:
        return {"kc_buf": self.buf, "kc_raw": self.raw, "kc_train_t": self.train_t, "kc_calq": self.calq, "kc_cal": self.cal,
                "kc_L": self.L,
                "kc_ints": self.ints, "kc_params": np.array([self.P, self.dim, self.k], np.int64),
                "kc_alert": np.array([self.alert])}

    @classmethod
    def from_arrays(cls, a: dict[str, np.ndarray]) -> KnnCad:
        P, dim, k = (int(v) for v in a["kc_params"])
        return cls(P, dim, k, float(a["kc_alert"][0]), *(np.array(a[f"kc_{n}"]) for n in ("buf", "raw", "train_t", "calq", "cal", "L", "ints")))
