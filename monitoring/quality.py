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
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Sequence

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
    latest = latest_labels(labels)
    by_label = {lab: 0 for lab in LABELS}
    for r in labels:
        by_label[r.label] = by_label.get(r.label, 0) + 1
    known = set(preds.record_id) if known_ids is None else set(known_ids)
    unknown = {rid for rid in latest if rid not in known}
    unknown_labels = sum(1 for r in labels if r.record_id in unknown)

    flagged = np.asarray(preds.flagged, dtype=bool)
    sampled = np.asarray(preds.sampled, dtype=bool) & ~flagged
    # each record id's latest capture decides its group
    last: dict[str, int] = {rid: i for i, rid in enumerate(preds.record_id)}
    rf = rfa = rs = rsa = 0
    for rid, lab in latest.items():
        i = last.get(rid)
        if i is None:
            continue
        if flagged[i]:
            rf += 1
            rfa += lab == "anomaly"
        elif sampled[i]:
            rs += 1
            rsa += lab == "anomaly"
    notes: list[str] = []
    precision = rfa / rf if rf else None
    n_flagged, n_sampled = int(flagged.sum()), int(sampled.sum())
    rates = np.asarray(preds.sample_rate, dtype=np.float64)[sampled] if len(preds.sample_rate) else np.full(n_sampled, np.nan)
    usable = np.isfinite(rates) & (rates > 0)
    if n_sampled and not usable.all():
        notes.append(f"{int((~usable).sum())} sampled captures without a sample rate are left out of the recall estimate")
    est_u = float(np.sum(1.0 / rates[usable])) if n_sampled else 0.0
    tp = fn = recall = None
    if precision is not None and rs:
        tp = precision * n_flagged
        fn = rsa / rs * est_u
        recall = tp / (tp + fn) if tp + fn > 0 else None
    elif not rs:
        notes.append("no reviewed random-sample capture: recall cannot be estimated")
    multi, disagreeing, share = disagreement(labels)
    return Quality(labels=len(labels), by_label=by_label, labelled_records=len(latest), unknown_records=len(unknown),
                   unknown_labels=unknown_labels, captured_flagged=n_flagged, captured_sampled=n_sampled,
                   reviewed_flagged=rf, reviewed_flagged_anomalies=int(rfa), reviewed_sampled=rs, reviewed_sampled_anomalies=int(rsa),
                   precision=precision, est_unflagged_records=est_u if n_sampled else None, est_true_positives=tp,
                   est_false_negatives=fn, recall_estimate=recall, multi_reviewer_records=multi, disagreeing_records=disagreeing,
                   disagreement=share, notes=notes)


def from_store(store: Any, model: str, *, role: str = "champion") -> Quality:
    """:func:`compute` on what ``store`` holds for ``model`` (features are not read)."""
    allp = store.predictions(model, features=False)
    keep = np.array([r == role for r in allp.role], dtype=bool)
    idx = np.flatnonzero(keep)
    sub = Predictions(record_id=[allp.record_id[i] for i in idx], version=allp.version[idx], role=[role] * idx.size,
                      score=allp.score[idx], flagged=allp.flagged[idx], sampled=allp.sampled[idx], ts=allp.ts[idx],
                      latency_us=allp.latency_us[idx], X=allp.X[idx], sample_rate=allp.sample_rate[idx])
    return compute(sub, store.labels(model), known_ids=allp.record_id)
