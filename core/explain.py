"""Per-record feature attributions: what every detector's explain kernel shares.

Each detector computes, inside its scoring kernel, a per-feature contribution vector for a record
(higher = pushes the record towards "anomalous") and keeps the ``top_k`` largest:

- ``iforest``: path-length reduction per split (see :mod:`core.iforest`); contributions sum to
  ``1 + log2(score)`` per record.
- ``robust_z``: ``|z_j|``.
- ``hbos``: the feature's term of the HBOS sum, ``-log`` of its bin's (smoothed, relative) density;
  contributions sum to the score.
- ``knn`` / ``lof``: the mean over the record's k nearest reference records of the squared
  per-feature difference; contributions sum to the mean squared distance to those k records.
- ``autoencoder``: the per-feature squared reconstruction error; their mean is the score.

Outputs are ``features`` (n, top_k) int64, most contributing first, and ``contributions``
(n, top_k) float64. Equal contributions rank the lower feature index first. A record that is not
explained (``flagged_only`` and ``score < threshold``) gets feature -1 and contribution NaN.
"""

from __future__ import annotations

from typing import Any

import numba as nb
import numpy as np

from .errors import InvalidInputError

NOT_EXPLAINED = -1


def check_top_k(top_k: Any, n_features: int) -> int:
    """``top_k`` as an int in ``[1, n_features]``, or :class:`InvalidInputError` saying what is allowed."""
    if isinstance(top_k, (bool, np.bool_)) or not isinstance(top_k, (int, np.integer)) or not 1 <= top_k <= n_features:
        raise InvalidInputError(
            f"top_k must be an integer in [1, {n_features}] (this model's number of features); got {top_k!r}"
        )
    return int(top_k)


def empty_outputs(n: int, top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """``(features, contributions)`` of ``n`` unexplained records: -1 and NaN."""
    return np.full((n, top_k), NOT_EXPLAINED, dtype=np.int64), np.full((n, top_k), np.nan, dtype=np.float64)


@nb.njit(nogil=True, cache=True, inline="always")
def select_top_k(c, feat_row, contrib_row):
    """Write the ``len(feat_row)`` largest entries of ``c`` (descending; ties: lower index first)
    into ``feat_row`` / ``contrib_row``: an insertion buffer, O(d * top_k), no allocation."""
    k = feat_row.shape[0]
    count = 0
    for j in range(c.shape[0]):
        v = c[j]
        if count == k:
            if not v > contrib_row[k - 1]:
                continue
            p = k - 1
        else:
            p = count
            count += 1
        # strict '<': an equal earlier entry stays ahead of the new one
        while p > 0 and contrib_row[p - 1] < v:
            contrib_row[p] = contrib_row[p - 1]
            feat_row[p] = feat_row[p - 1]
            p -= 1
        contrib_row[p] = v
        feat_row[p] = j


@nb.njit(nogil=True, cache=True, inline="always")
def mark_unexplained(feat_row, contrib_row):
    for p in range(feat_row.shape[0]):
        feat_row[p] = NOT_EXPLAINED
        contrib_row[p] = np.nan


@nb.njit(nogil=True, cache=True)
def top_k_rows(C, feat, contrib):
    """Row-wise :func:`select_top_k` of a full contribution matrix ``C`` (n, d)."""
    for r in range(C.shape[0]):
        select_top_k(C[r], feat[r], contrib[r])


def top_k_of(C: np.ndarray, top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """``(features, contributions)`` of the ``top_k`` largest entries of each row of ``C``."""
    C = np.ascontiguousarray(C, dtype=np.float64)
    feat = np.empty((C.shape[0], top_k), dtype=np.int64)
    contrib = np.empty((C.shape[0], top_k), dtype=np.float64)
    top_k_rows(C, feat, contrib)
    return feat, contrib
