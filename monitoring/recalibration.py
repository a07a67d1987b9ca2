"""Threshold re-calibration from captured live traffic and reviewers' labels.

Two targets (scores: higher = more anomalous; a record is flagged when ``score >= threshold``):

* **alert rate** ``R``: the threshold that flags a share ``R`` of the live traffic. Capture keeps
  every flagged record and each other record with probability ``sample_rate`` (stored per row), so
  the captured records are a weighted sample of the traffic: a flagged record stands for itself
  (weight 1), a sampled one for ``1 / sample_rate`` records. The threshold is the score at which the
  weighted count of captured records scoring at or above it first reaches ``R`` times the weighted
  total (with every weight 1 it is the ``ceil(R * n)``-th highest score, as at training time).
* **precision** ``P``: labels joined with the version's captured scores (latest label and latest
  capture per record id); the threshold is the lowest labelled score ``t`` at which the precision of
  the records scoring ``>= t`` is at least ``P`` (precision is not monotonic in ``t``, so every
  candidate is checked), with at least ``min_support`` labelled records at or above it. Labelled
  records are not a random sample of the traffic: reviewers label alerts, and an unflagged record is
  captured with probability ``sample_rate`` only. So each labelled record is weighted by the inverse
  of its chance to be there: its capture weight (1 flagged, ``1 / sample_rate`` sampled) times
  captured over labelled records of its stratum (flagged / sampled). Plain precision over the
  labelled records overstated it badly (0.3 asked, 0.13 real, 53% of traffic flagged). The result
  carries a 90% Wilson interval on the effective number of records; a threshold whose estimated
  alert rate is far above the current one is refused unless forced.

The result is published as a new threshold version of the model version
(:meth:`core.registry.Registry.publish_threshold`); serving workers pick it up without reloading.
"""

from __future__ import annotations

import getpass
import math
import os
import socket
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from outlierd.core.errors import InvalidInputError
from outlierd.core.labels import ANOMALY
from outlierd.core.registry import CHAMPION, Registry

from .store import store_name

MIN_ALERTS = 10       # alert rate: the weighted sample must hold at least this many expected alerts
MIN_RECORDS = 100     # alert rate: captured records (flagged + sampled) at least
MIN_LABELS = 30       # precision: labelled records with a captured score at least
MIN_POSITIVES = 5     # precision: labelled anomalies at least
MIN_SUPPORT = 20      # precision: labelled records at or above the threshold at least
ALERT_RATE_JUMP = 3.0  # precision: refuse (unless forced) a threshold flagging this many times the current rate ...
ALERT_RATE_SLACK = 0.01  # ... and this much more of the traffic
Z90 = 1.6448536269514722  # two-sided 90% normal quantile


@dataclass
class Calibration:
    """A computed threshold and what it rests on."""

    model: str
    version: int
    method: str                 # "alert_rate" | "precision"
    target: float
    threshold: float
    previous: float             # the threshold in force before
    previous_threshold_version: int
    estimated_alert_rate: float | None  # on the captured traffic (weighted), at the new threshold
    precision: float | None     # on labelled records at the new threshold (precision method)
    flagged_labelled: int | None  # labelled records at or above the new threshold (precision method)
    records: int                # captured records used
    sampled: int                # of which random-sample captures
    labelled: int               # labelled records used (precision method; 0 otherwise)
    threshold_version: int | None = None  # set once published
    notes: list[str] = field(default_factory=list)
    precision_ci: tuple[float, float] | None = None  # 90% interval of the precision estimate (precision method)
    current_alert_rate: float | None = None  # estimated at the threshold in force, on the same captures
    refused: str | None = None  # why publishing it needs --force (a far higher alert rate); None: fine

    def info(self) -> dict[str, Any]:
        """What goes into the threshold version's record (besides the value)."""
        d = asdict(self)
        for k in ("model", "version", "threshold", "threshold_version"):
            d.pop(k)
        d["tool"] = "outlierd threshold calibrate"
        return d


def _check_rate(name: str, value: float) -> float:
    value = float(value)
    if not math.isfinite(value) or not 0.0 < value < 1.0:
        raise InvalidInputError(f"{name} must be in (0, 1); got {value}")
    return value


def weights_of(flagged: np.ndarray, sampled: np.ndarray, sample_rate: np.ndarray) -> np.ndarray:
    """Inverse-probability weights of captured records: 1 for flagged ones (always captured),
    ``1 / sample_rate`` for sampled ones. Raises ``InvalidInputError`` (a ``ValueError``) when a sampled record's rate is unknown."""
    flagged = np.asarray(flagged, dtype=bool)
    sampled = np.asarray(sampled, dtype=bool)
    rate = np.asarray(sample_rate, dtype=np.float64)
    w = np.ones(flagged.shape[0])
    s = sampled & ~flagged
    if s.any():
        r = rate[s]
        if not np.all(np.isfinite(r) & (r > 0) & (r <= 1)):
            raise InvalidInputError("some sampled captures have no usable sample rate (stored NaN or 0): cannot weight them")
        w[s] = 1.0 / r
    return w


def alert_rate_threshold(scores: np.ndarray, weights: np.ndarray, alert_rate: float) -> float:
    """The score ``t`` (one of ``scores``) at which the weighted share of scores ``>= t`` first
    reaches ``alert_rate``, scanning from the highest score down. With unit weights: the
    ``ceil(alert_rate * n)``-th highest score."""
    alert_rate = _check_rate("alert rate", alert_rate)
    scores = np.asarray(scores, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    if scores.size == 0:
        raise InvalidInputError("cannot calibrate a threshold on zero scores")
    if not np.all(np.isfinite(scores)):
        raise InvalidInputError(f"captured scores hold {int(np.count_nonzero(~np.isfinite(scores)))} non-finite values")
    order = np.argsort(-scores, kind="stable")
    cum = np.cumsum(w[order])
    goal = alert_rate * cum[-1]
    # relative tolerance: with unit weights, cum is exact integers, goal may be 4.0000000001
    k = int(np.searchsorted(cum, goal * (1 - 1e-12), side="left"))
    return float(scores[order[min(k, scores.size - 1)]])


def precision_threshold(scores: np.ndarray, y: np.ndarray, precision: float) -> tuple[float, float, int]:
    """The lowest ``t`` among ``scores`` with precision (share of ``y == 1`` among records scoring
    ``>= t``) at least ``precision``: ``(t, precision at t, records at or above t)``. Raises
    ``InvalidInputError`` when no threshold reaches it."""
    precision = float(precision)
    if not math.isfinite(precision) or not 0.0 < precision <= 1.0:
        raise InvalidInputError(f"precision target must be in (0, 1]; got {precision}")
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(y).astype(bool)
    if s.size == 0:
        raise InvalidInputError("no labelled records with captured scores")
    if not np.all(np.isfinite(s)):
        raise InvalidInputError(f"labelled records' scores hold {int(np.count_nonzero(~np.isfinite(s)))} non-finite values")
    uniq, inv = np.unique(s, return_inverse=True)  # ascending
    pos = np.bincount(inv, weights=y, minlength=uniq.size)
    cnt = np.bincount(inv, minlength=uniq.size)
    tp = np.cumsum(pos[::-1])[::-1]  # labelled anomalies scoring >= uniq[i]
    n = np.cumsum(cnt[::-1])[::-1]
    prec = tp / n
    ok = np.flatnonzero(prec >= precision - 1e-12)
    if ok.size == 0:
        raise InvalidInputError(f"precision {precision:g} is not reachable on the labelled records: the best is "
                                f"{prec.max():.4f} (at threshold {uniq[int(np.argmax(prec))]:.6g}, {int(n[int(np.argmax(prec))])} records)")
    i = int(ok[0])
    return float(uniq[i]), float(prec[i]), int(n[i])


def wilson(p: float, n_eff: float, z: float = Z90) -> tuple[float, float]:
    """Wilson score interval of a proportion ``p`` estimated from ``n_eff`` (effective) records."""
    if n_eff <= 0:
        return 0.0, 1.0
    d = 1 + z * z / n_eff
    centre = (p + z * z / (2 * n_eff)) / d
    half = z * math.sqrt(max(p * (1 - p) / n_eff + z * z / (4 * n_eff * n_eff), 0.0)) / d
    # the interval contains p (a Wilson property): keep it so through rounding, e.g. at p = 1
    return max(0.0, min(centre - half, p)), min(1.0, max(centre + half, p))


def weighted_precision_threshold(scores: np.ndarray, y: np.ndarray, w: np.ndarray, precision: float,
                                 min_support: int = MIN_SUPPORT) -> tuple[float, float, int, tuple[float, float]]:
    """The lowest ``t`` among ``scores`` with at least ``min_support`` records at or above it whose
    weighted precision (``sum(w * y) / sum(w)`` over records scoring ``>= t``) is at least
    ``precision``: ``(t, precision at t, records at or above t, 90% interval)``. With unit weights
    and ``min_support`` 1 it is :func:`precision_threshold`. Raises ``InvalidInputError`` when no
    threshold reaches it."""
    precision = float(precision)
    if not math.isfinite(precision) or not 0.0 < precision <= 1.0:
        raise InvalidInputError(f"precision target must be in (0, 1]; got {precision}")
    s = np.asarray(scores, dtype=np.float64)
    yb = np.asarray(y).astype(bool)
    w = np.asarray(w, dtype=np.float64)
    if s.size == 0:
        raise InvalidInputError("no labelled records with captured scores")
    if not np.all(np.isfinite(s)):
        raise InvalidInputError(f"labelled records' scores hold {int(np.count_nonzero(~np.isfinite(s)))} non-finite values")
    uniq, inv = np.unique(s, return_inverse=True)  # ascending
    rev = slice(None, None, -1)
    tp = np.cumsum(np.bincount(inv, weights=w * yb, minlength=uniq.size)[rev])[rev]  # weight of anomalies >= uniq[i]
    tot = np.cumsum(np.bincount(inv, weights=w, minlength=uniq.size)[rev])[rev]
    sq = np.cumsum(np.bincount(inv, weights=w * w, minlength=uniq.size)[rev])[rev]
    n = np.cumsum(np.bincount(inv, minlength=uniq.size)[rev])[rev]
    prec = tp / tot
    ok = np.flatnonzero((prec >= precision - 1e-12) & (n >= min_support))
    if ok.size == 0:
        supported = n >= min_support
        best = int(np.argmax(np.where(supported, prec, -1.0))) if supported.any() else int(np.argmax(prec))
        raise InvalidInputError(f"precision {precision:g} is not reachable on the labelled records with at least {min_support} "
                                f"of them at or above the threshold: the best is {prec[best]:.4f} (at threshold "
                                f"{uniq[best]:.6g}, {int(n[best])} labelled records)")
    i = int(ok[0])
    return float(uniq[i]), float(prec[i]), int(n[i]), wilson(float(prec[i]), float(tot[i] ** 2 / sq[i]))


def _latest_per_id(ids: list[str], *cols: np.ndarray) -> tuple[list[str], list[np.ndarray]]:
    """Keep the last row of each id (capture order), in first-seen order of those last rows."""
    last: dict[str, int] = {}
    for i, rid in enumerate(ids):
        last[rid] = i
    idx = np.fromiter(sorted(last.values()), dtype=np.int64, count=len(last))
    return [ids[i] for i in idx], [np.asarray(c)[idx] for c in cols]


def calibrate(registry: Registry, store: Any, model: str, ref: int | str = CHAMPION, *, alert_rate: float | None = None,
              precision: float | None = None, min_records: int = MIN_RECORDS, min_labels: int = MIN_LABELS,
              min_support: int = MIN_SUPPORT) -> Calibration:
    """Compute a new threshold for version ``ref`` of ``model`` from the captures and labels in
    ``store`` (a :class:`monitoring.store.Store`); exactly one of ``alert_rate`` / ``precision``.
    Nothing is published: see :func:`publish`. Raises ``InvalidInputError`` (a ``ValueError``) with the reason when the data
    cannot support the target."""
    if (alert_rate is None) == (precision is None):
        raise InvalidInputError("give exactly one target: --alert-rate R or --precision P")
    version = registry.resolve(model, ref)
    previous, prev_n = registry.threshold(model, version)
    preds = store.predictions(model, version=version, features=False)
    if len(preds) == 0:
        raise InvalidInputError(f"no captured predictions of {model!r} version {version} in the feedback store: serve it "
                                "with capture on (the default) and let traffic flow first")
    notes: list[str] = []
    ids, (score, flagged, sampled, rate) = _latest_per_id(preds.record_id, preds.score, preds.flagged, preds.sampled, preds.sample_rate)
    if len(ids) < len(preds):
        notes.append(f"{len(preds) - len(ids)} repeated captures of the same record ids ignored (latest kept)")
    if alert_rate is not None:
        alert_rate = _check_rate("--alert-rate", alert_rate)
        if not np.any(sampled & ~flagged):
            raise InvalidInputError(f"no sampled captures of {model!r} version {version}, only flagged ones: the size of the "
                                    "traffic is unknown; serve with --capture-sample > 0")
        w = weights_of(flagged, sampled, rate)
        total = float(w.sum())
        if len(ids) < min_records or alert_rate * total < MIN_ALERTS:
            raise InvalidInputError(f"not enough captured traffic for alert rate {alert_rate:g}: {len(ids)} captured records "
                                    f"standing for {total:.0f} scored ones (need {min_records} captured and "
                                    f"{MIN_ALERTS / alert_rate:.0f} scored); capture more or raise the capture sample rate")
        t = alert_rate_threshold(score, w, alert_rate)
        rate_est = float(w[score >= t].sum() / total)
        return Calibration(model, version, "alert_rate", alert_rate, t, previous, prev_n, rate_est, None, None, len(ids),
                           int(np.count_nonzero(sampled)), 0, notes=notes)
    precision = float(precision)  # type: ignore[arg-type]
    if not math.isfinite(precision) or not 0.0 < precision <= 1.0:
        raise InvalidInputError(f"--precision must be in (0, 1]; got {precision}")
    labels = store.labels(model)
    latest: dict[str, str] = {}
    for row in labels:  # arrival order: the last label of a record wins
        latest[row.record_id] = row.label
    position = {rid: i for i, rid in enumerate(ids)}
    joined = [(position[rid], lab == ANOMALY) for rid, lab in latest.items() if rid in position]
    if len(joined) < min_labels:
        raise InvalidInputError(f"not enough labels for a precision target: {len(joined)} labelled records of {model!r} version "
                                f"{version} have a captured score (need {min_labels}; {len(latest)} labelled ids in all)")
    at = np.array([j[0] for j in joined], dtype=np.int64)
    y = np.array([j[1] for j in joined])
    if int(y.sum()) < MIN_POSITIVES:
        raise InvalidInputError(f"not enough labelled anomalies for a precision target: {int(y.sum())} (need {MIN_POSITIVES})")
    unflagged = sampled & ~flagged
    try:
        capture_w: np.ndarray | None = weights_of(flagged, sampled, rate)
    except ValueError:  # sample rates unknown: labelled records count alike, and no alert rate estimate
        capture_w = None
        notes.append("sample rates unknown: labelled records are not weighted (precision may be overstated)")
    lw = np.ones(at.size)
    if capture_w is not None:
        # inverse chance to be labelled: capture weight x captured / labelled records of its stratum
        lw = capture_w[at].copy()
        for stratum in (flagged, unflagged):
            in_stratum = stratum[at]
            if in_stratum.any():
                lw[in_stratum] *= np.count_nonzero(stratum) / np.count_nonzero(in_stratum)
        if not unflagged[at].any() and unflagged.any():
            notes.append("no labelled sampled (unflagged) records: below the capture-time threshold precision cannot be "
                         "estimated, so only thresholds at or above every unflagged capture are considered")
            floor = float(score[unflagged].max())
            keep = score[at] > floor
            at, y, lw = at[keep], y[keep], lw[keep]
    t, p, k, ci = weighted_precision_threshold(score[at], y, lw, precision, min_support)
    est = cur = None
    refused = None
    if capture_w is not None and unflagged.any():
        est = float(capture_w[score >= t].sum() / capture_w.sum())
        cur = float(capture_w[score >= previous].sum() / capture_w.sum())
        if est > ALERT_RATE_JUMP * cur and est - cur > ALERT_RATE_SLACK:
            refused = (f"the new threshold would flag about {est:.2%} of the traffic, {est / max(cur, 1e-12):.1f}x the "
                       f"{cur:.2%} flagged now: check the labels, or publish it anyway with --force")
    return Calibration(model, version, "precision", precision, t, previous, prev_n, est, p, k, len(ids),
                       int(np.count_nonzero(sampled)), len(joined), notes=notes, precision_ci=ci, current_alert_rate=cur,
                       refused=refused)


def publish(registry: Registry, cal: Calibration, store_path: str | os.PathLike | None = None) -> int:
    """Publish ``cal`` as the next threshold version of its model version; returns its number."""
    info = cal.info()
    if store_path is not None:
        info["feedback_store"] = store_name(store_path)  # a URL kept whole, its password left out
    try:
        info["by"] = f"{getpass.getuser()}@{socket.gethostname()}"
    except Exception:  # no login name in a container
        info["by"] = socket.gethostname()
    cal.threshold_version = registry.publish_threshold(cal.model, cal.version, cal.threshold, info)
    return cal.threshold_version
