"""Live quality of a served model from reviewers' labels: pure functions over store data.

Inputs are the captured predictions of one role (:class:`~monitoring.store.Predictions`) and every
stored label (:class:`~monitoring.store.LabelRow`, arrival order). A record's label is its latest one;
a record's capture is its latest capture.

* **precision** of alerts: reviewed flagged records labelled anomaly / reviewed flagged records.
* **recall estimate**: every flagged record is captured, the others with probability ``s`` (the
  capture sample rate in force, stored per capture). Reviewed flagged records give the precision,
  so the flagged anomalies are about ``TP = precision * flagged captures``. Each sampled unflagged
  capture stands for ``1 / s`` unflagged records (an inverse-probability estimate of the unflagged
  population ``U = sum(1 / s_i)``); the share of anomalies among the *reviewed* sampled ones, ``a / m``,
  gives the missed anomalies ``FN = (a / m) * U``. ``recall = TP / (TP + FN)``. It assumes reviewers
  pick records within each group (flagged, sampled) independently of their label; with few
  reviewed samples it is noisy. None when either group has no reviewed record, or TP + FN = 0.
* **disagreement**: among records labelled by at least two reviewers (each reviewer's latest label;
  an empty reviewer name is one anonymous reviewer), the share whose labels differ.
* counts: labels by label, labelled records, and labelled record ids without any captured
  prediction (``unknown``).
* **anomaly features** (:func:`anomaly_features`): which features most often explain the captured
  records labelled anomaly (each record's top-1 feature from ``model.explain``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .store import LABELS, LabelRow, Predictions


@dataclass(frozen=True)
class Quality:
    labels: int                         # label rows stored
    by_label: dict[str, int]            # label rows per label
    labelled_records: int               # distinct labelled record ids
    unknown_records: int                # ... of which no captured prediction has the id
    unknown_labels: int                 # label rows for such ids
    captured_flagged: int               # flagged captures (of the role)
    captured_sampled: int               # sampled unflagged captures
    reviewed_flagged: int               # labelled records whose latest capture is flagged
    reviewed_flagged_anomalies: int
    reviewed_sampled: int               # labelled records whose latest capture is a sampled unflagged one
    reviewed_sampled_anomalies: int
    precision: float | None
    est_unflagged_records: float | None  # sum of 1 / sample rate over sampled captures
    est_true_positives: float | None
    est_false_negatives: float | None
    recall_estimate: float | None
    multi_reviewer_records: int
    disagreeing_records: int
    disagreement: float | None
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def latest_labels(labels: Iterable[LabelRow]) -> dict[str, str]:
    """``{record_id: its latest label}``, in order of first appearance."""
    out: dict[str, str] = {}
    for r in labels:
        out[r.record_id] = r.label
    return out


def disagreement(labels: Iterable[LabelRow]) -> tuple[int, int, float | None]:
    """``(records with >= 2 reviewers, of which disagreeing, share)``; each reviewer's latest label counts."""
    per_record: dict[str, dict[str, str]] = {}
    for r in labels:
        per_record.setdefault(r.record_id, {})[r.reviewer] = r.label
    multi = [set(v.values()) for v in per_record.values() if len(v) >= 2]
    disagreeing = sum(1 for s in multi if len(s) > 1)
    return len(multi), disagreeing, (disagreeing / len(multi) if multi else None)


def compute(preds: Predictions, labels: Sequence[LabelRow], *, known_ids: Iterable[str] | None = None) -> Quality:
    """Quality from one role's captures ``preds`` and every label of the model (see the module
    docstring). ``known_ids``: record ids captured in any role (default: ``preds``' ids), for the
    unknown-id counts."""
    flagged = np.asarray(preds.flagged, dtype=bool)
    sampled = np.asarray(preds.sampled, dtype=bool) & ~flagged
    rates = np.asarray(preds.sample_rate, dtype=np.float64) if len(preds.sample_rate) else np.full(len(flagged), np.nan)
    usable = sampled & np.isfinite(rates) & (rates > 0)
    last: dict[str, int] = {rid: i for i, rid in enumerate(preds.record_id)}  # each id's latest capture decides its group
    captures = {rid: ((bool(flagged[last[rid]]), bool(sampled[last[rid]])) if rid in last else None) for rid in latest_labels(labels)}
    known = set(preds.record_id) if known_ids is None else set(known_ids)
    return summarize(labels, captures, known, captured_flagged=int(flagged.sum()), captured_sampled=int(sampled.sum()),
                     sampled_weight=float(np.sum(1.0 / rates[usable])), sampled_no_rate=int(sampled.sum() - usable.sum()))


def summarize(labels: Sequence[LabelRow], captures: dict[str, tuple[bool, bool] | None], known: set[str], *,
              captured_flagged: int, captured_sampled: int, sampled_weight: float, sampled_no_rate: int = 0) -> Quality:
    """The estimators from what they need: every label; per labelled record id its latest capture's
    ``(flagged, sampled)`` (None: not captured in this role); the ids captured in any role; the
    capture totals (``sampled_weight``: sum of 1 / sample rate over the sampled unflagged captures)."""
    latest = latest_labels(labels)
    by_label = {lab: 0 for lab in LABELS}
    for r in labels:
        by_label[r.label] = by_label.get(r.label, 0) + 1
    unknown = {rid for rid in latest if rid not in known}
    unknown_labels = sum(1 for r in labels if r.record_id in unknown)
    rf = rfa = rs = rsa = 0
    for rid, lab in latest.items():
        c = captures.get(rid)
        if c is None:
            continue
        if c[0]:
            rf += 1
            rfa += lab == "anomaly"
        elif c[1]:
            rs += 1
            rsa += lab == "anomaly"
    notes: list[str] = []
    if sampled_no_rate:
        notes.append(f"{sampled_no_rate} sampled captures without a sample rate are left out of the recall estimate")
    precision = rfa / rf if rf else None
    tp = fn = recall = None
    if precision is not None and rs:
        tp = precision * captured_flagged
        fn = rsa / rs * sampled_weight
        recall = tp / (tp + fn) if tp + fn > 0 else None
    elif not rs:
        notes.append("no reviewed random-sample capture: recall cannot be estimated")
    multi, disagreeing, share = disagreement(labels)
    return Quality(labels=len(labels), by_label=by_label, labelled_records=len(latest), unknown_records=len(unknown),
                   unknown_labels=unknown_labels, captured_flagged=captured_flagged, captured_sampled=captured_sampled,
                   reviewed_flagged=rf, reviewed_flagged_anomalies=int(rfa), reviewed_sampled=rs, reviewed_sampled_anomalies=int(rsa),
                   precision=precision, est_unflagged_records=sampled_weight if captured_sampled else None, est_true_positives=tp,
                   est_false_negatives=fn, recall_estimate=recall, multi_reviewer_records=multi, disagreeing_records=disagreeing,
                   disagreement=share, notes=notes)


def from_store(store: Any, model: str, *, role: str = "champion", since: float | None = None) -> Quality:
    """Quality of what ``store`` holds for ``model``. A store with ``quality_inputs`` (SQLite) answers
    from running totals and one lookup per labelled record; any other :class:`Store` is read whole
    (features left out) and goes through :func:`compute`. ``since`` (epoch seconds): only captures
    and labels from then on (the store is then read whole: running totals cover all time)."""
    labels = store.labels(model)
    if since is not None:
        labels = [r for r in labels if r.ts is None or r.ts >= since]
    if hasattr(store, "quality_inputs") and since is None:
        q = store.quality_inputs(model, role)
        return summarize(labels, q["captures"], q["known"], captured_flagged=q["captured_flagged"], captured_sampled=q["captured_sampled"],
                         sampled_weight=q["sampled_weight"], sampled_no_rate=q["sampled_no_rate"])
    allp = store.predictions(model, features=False)
    in_window = np.ones(len(allp.record_id), dtype=bool) if since is None else np.asarray(allp.ts) >= since
    idx = np.flatnonzero(np.array([r == role for r in allp.role], dtype=bool) & in_window)
    sub = Predictions(record_id=[allp.record_id[i] for i in idx], version=allp.version[idx], role=[role] * idx.size,
                      score=allp.score[idx], flagged=allp.flagged[idx], sampled=allp.sampled[idx], ts=allp.ts[idx],
                      latency_us=allp.latency_us[idx], X=allp.X[idx], sample_rate=allp.sample_rate[idx])
    return compute(sub, labels, known_ids=allp.record_id)


def anomaly_features(model: Any, X: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    """Which features explain the records labelled anomaly: ``X`` (n, d) and ``y`` (1 anomaly, 0
    normal) as :meth:`~monitoring.store.Store.labelled` returns them; each ``y == 1`` record's top-1
    feature from ``model.explain`` is counted. Returns ``{"version", "records", "features": [{"name",
    "count", "share"}]}``, most often first (ties: feature order), features never top-1 left out.
    Raises what ``model.explain`` raises (e.g. captured records of another feature count)."""
    A = np.asarray(X, dtype=np.float64)[np.asarray(y) == 1]
    n = A.shape[0]
    counts = np.zeros(model.n_features, dtype=np.int64)
    if n:
        feat, _ = model.explain(A, 1)
        counts = np.bincount(feat[:, 0], minlength=model.n_features)
    order = sorted(np.flatnonzero(counts).tolist(), key=lambda j: (-counts[j], j))
    return {"version": model.version, "records": n,
            "features": [{"name": model.feature_names[j], "count": int(counts[j]), "share": float(counts[j] / n)} for j in order]}
