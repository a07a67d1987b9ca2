"""Champion vs challenger from captured traffic, promotion gates, promotion and rollback.

Pure functions over a feedback store (:mod:`monitoring.store`) and a registry. What the captures
hold: every record a role flagged, plus a random sample (rate stored per row) of the others; in
shadow mode both roles score the same messages, so record ids join them (records sent without ids
get per-capture generated ids and do not join). Estimates:

* **alert rate** of a role: flagged captures over the captures weighted by the inverse sample rate
  (flagged ones weigh 1), i.e. over the estimated number of records scored.
* **agreement**: the share of records both roles flag alike, estimated over the traffic:
  ``1 - |F_champion xor F_challenger| / N`` (every flagged record is captured, so the disagreeing
  records are all known; ``N`` is the champion's weighted count in the same time window). Needs
  shadow captures (records scored by both); with split traffic it is not defined.
* **Jaccard** of the flagged id sets; **Spearman** rank correlation of the two scores over the
  records captured for both roles. In shadow mode the challenger's captures sample the records the
  champion's sampled, so these are the champion's random sample plus the records both flagged (the
  flagged ones over-represent the top of the ranking; the sample keeps the set telling).
* **precision** of a role: labelled anomalies among its flagged records that carry a label (latest
  label per record id).
* **latency**: mean and p99 of the captured per-record kernel time of each role.

Gates (defaults in :data:`DEFAULT_GATES`, every one can be switched off with ``None``):
``min_records`` challenger captures (200), ``min_agreement`` (0.9), ``min_jaccard`` overlap of the
alerts (0.5), ``min_labelled`` labelled
flagged records per role (30), ``min_precision_gain`` challenger minus champion precision (0.0: not
worse), ``max_latency_ratio`` challenger / champion mean latency (1.5). A gate whose inputs are
missing fails, saying so.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from outlierd.core.errors import InvalidInputError, ModelNotFoundError
from outlierd.core.labels import ANOMALY
from outlierd.core.registry import CHALLENGER, CHAMPION, Registry

from .recalibration import weights_of

WINDOW_SLACK_S = 5.0  # champion captures this long before the first / after the last challenger capture count
PROMOTE_ACTION = "promote"
ROLLBACK_ACTION = "rollback"


@dataclass(frozen=True)
class Gates:
    """Promotion gates; ``None`` switches one off."""

    min_records: int | None = 200
    """Challenger records captured (the evidence) at least."""
    min_agreement: float | None = 0.9
    """Share of records both flag alike (estimated over the traffic; needs shadow captures) at least."""
    min_jaccard: float | None = 0.5
    """Overlap of the two roles' alerts (Jaccard of the flagged id sets) at least. At a 1% alert rate
    two models can agree on 99% of the traffic while sharing a quarter of their alerts: agreement
    over the traffic alone says little about the alerts."""
    min_labelled: int | None = 30
    """Labelled flagged records per role at least (for the precision gate)."""
    min_precision_gain: float | None = 0.0
    """Challenger precision minus champion precision (on labelled flagged records) at least."""
    max_latency_ratio: float | None = 1.5
    """Challenger / champion mean captured kernel latency per record at most."""

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> Gates:
        """Gates from a JSON object with any of the field names (``null`` switches a gate off)."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise InvalidInputError(f"cannot read gates file {path}: {e}") from e
        if not isinstance(data, dict):
            raise InvalidInputError(f"gates file {path} must hold a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InvalidInputError(f"gates file {path}: unknown gates {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**{**asdict(cls()), **data}).validated()

    def validated(self) -> Gates:
        for f in fields(self):
            v = getattr(self, f.name)
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise InvalidInputError(f"gate {f.name} must be a finite number or null; got {v!r}")
        for name in ("min_records", "min_labelled", "max_latency_ratio"):
            v = getattr(self, name)
            if v is not None and v < 0:
                raise InvalidInputError(f"gate {name} must be >= 0; got {v}")
        for name in ("min_agreement", "min_jaccard"):
            v = getattr(self, name)
            if v is not None and not 0.0 <= v <= 1.0:
                raise InvalidInputError(f"gate {name} must be in [0, 1]; got {v}")
        return self


DEFAULT_GATES = Gates()


@dataclass
class RoleStats:
    role: str
    version: int
    records: int                      # distinct record ids captured in the window
    flagged: int
    sampled: int
    scored_estimate: float | None     # records scored, estimated from the sample weights
    alert_rate: float | None
    labelled: int                     # captured records with a label
    labelled_flagged: int
    precision: float | None           # labelled anomalies / labelled flagged
    latency_mean_us: float | None
    latency_p99_us: float | None


@dataclass
class Comparison:
    model: str
    champion: RoleStats
    challenger: RoleStats
    window: tuple[float, float]       # epoch seconds of the challenger captures
    joined: int                       # record ids captured for both roles
    alert_rate_diff: float | None     # challenger - champion
    agreement: float | None           # share of records flagged alike, over the traffic
    agreement_joined: float | None    # the same on the joined records only
    jaccard: float | None             # of the flagged id sets
    spearman: float | None            # on the joined records
    precision_gain: float | None      # challenger - champion
    latency_ratio: float | None       # challenger / champion mean
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class GateResult:
    name: str
    value: float | None
    limit: float
    passed: bool
    reason: str


def _latest(ids: list[str], ts: np.ndarray, *cols: np.ndarray) -> tuple[list[str], list[np.ndarray]]:
    last: dict[str, int] = {}
    for i, rid in enumerate(ids):
        last[rid] = i
    idx = np.fromiter(sorted(last.values()), dtype=np.int64, count=len(last))
    return [ids[i] for i in idx], [np.asarray(c)[idx] for c in (ts, *cols)]


def _role_stats(role: str, version: int, preds: Any, mask: np.ndarray, labels: dict[str, int]) -> tuple[RoleStats, dict[str, float], set[str]]:
    ids = [rid for rid, m in zip(preds.record_id, mask) if m]
    ids, (ts, score, flagged, sampled, rate, lat) = _latest(ids, preds.ts[mask], preds.score[mask], preds.flagged[mask],
                                                            preds.sampled[mask], preds.sample_rate[mask], preds.latency_us[mask])
    n_flag = int(np.count_nonzero(flagged))
    n_samp = int(np.count_nonzero(sampled & ~flagged))
    scored = alert = None
    if n_samp:
        try:
            w = weights_of(flagged, sampled, rate)
            scored = float(w.sum())
            alert = n_flag / scored
        except ValueError:
            pass
    y = np.array([labels.get(rid, -1) for rid in ids], dtype=np.int8)
    has = y >= 0
    lf = has & flagged
    precision = float(np.mean(y[lf] == 1)) if lf.any() else None
    finite = lat[np.isfinite(lat)]
    stats = RoleStats(role, version, len(ids), n_flag, n_samp, scored, alert, int(has.sum()), int(lf.sum()), precision,
                      float(finite.mean()) if finite.size else None, float(np.percentile(finite, 99)) if finite.size else None)
    flagged_ids = {rid for rid, f in zip(ids, flagged) if f}
    return stats, dict(zip(ids, score.tolist())), flagged_ids


def _spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    if a.size < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return None
    try:
        from scipy.stats import spearmanr
    except ImportError:  # rank correlation by hand (average ranks for ties)
        from scipy.stats import rankdata  # pragma: no cover - scipy comes with scikit-learn

        return float(np.corrcoef(rankdata(a), rankdata(b))[0, 1])  # pragma: no cover
    return float(spearmanr(a, b).statistic)


def _versions(registry: Registry, model: str) -> tuple[int, int]:
    champ = registry.resolve(model, CHAMPION)
    try:
        chal = registry.resolve(model, CHALLENGER)
    except ModelNotFoundError:
        raise InvalidInputError(f"model {model!r} has no {CHALLENGER!r} alias: nothing to compare (publish a challenger, "
                                f"e.g. outlierd retrain-policy or registry alias)") from None
    if chal == champ:
        raise InvalidInputError(f"{CHAMPION!r} and {CHALLENGER!r} of {model!r} are the same version {champ}: nothing to compare")
    return champ, chal


def compare(registry: Registry, store: Any, model: str) -> Comparison:
    """Champion vs challenger on the captured traffic (see the module docstring). Raises
    ``InvalidInputError`` saying why when there is nothing to compare."""
    champ_v, chal_v = _versions(registry, model)
    chal = store.predictions(model, role=CHALLENGER, version=chal_v, features=False)
    if len(chal) == 0:
        raise InvalidInputError(f"no captured challenger traffic for {model!r} version {chal_v}: serve with --rollout shadow "
                                "(or split) and capture on, and let traffic flow")
    t0, t1 = float(chal.ts.min()), float(chal.ts.max())
    champ = store.predictions(model, role=CHAMPION, version=champ_v, features=False)
    in_window = (champ.ts >= t0 - WINDOW_SLACK_S) & (champ.ts <= t1 + WINDOW_SLACK_S)
    if not in_window.any():
        raise InvalidInputError(f"no captured champion traffic of {model!r} version {champ_v} while the challenger (version "
                                f"{chal_v}) was captured: nothing to compare")
    labels: dict[str, int] = {}
    for row in store.labels(model):  # arrival order: the last label of a record wins
        labels[row.record_id] = 1 if row.label == ANOMALY else 0
    a, a_scores, a_flag = _role_stats(CHAMPION, champ_v, champ, in_window, labels)
    b, b_scores, b_flag = _role_stats(CHALLENGER, chal_v, chal, np.ones(len(chal), dtype=bool), labels)
    notes: list[str] = []
    joined_ids = [rid for rid in b_scores if rid in a_scores]
    sa = np.array([a_scores[r] for r in joined_ids])
    sb = np.array([b_scores[r] for r in joined_ids])
    agreement = agreement_joined = jaccard = None
    if joined_ids:
        union = a_flag | b_flag
        jaccard = len(a_flag & b_flag) / len(union) if union else 1.0
        fa = np.array([r in a_flag for r in joined_ids])
        fb = np.array([r in b_flag for r in joined_ids])
        agreement_joined = float(np.mean(fa == fb))
        if a.scored_estimate:
            agreement = max(0.0, 1.0 - len(a_flag ^ b_flag) / a.scored_estimate)
        else:
            notes.append("no sampled champion captures: agreement over the traffic cannot be estimated")
    else:
        notes.append("no record id was captured for both roles (split traffic, or records without ids): "
                     "agreement and rank correlation need shadow captures")
    diff = b.alert_rate - a.alert_rate if a.alert_rate is not None and b.alert_rate is not None else None
    gain = b.precision - a.precision if a.precision is not None and b.precision is not None else None
    ratio = (b.latency_mean_us / a.latency_mean_us if a.latency_mean_us and b.latency_mean_us is not None else None)
    return Comparison(model, a, b, (t0, t1), len(joined_ids), diff, agreement, agreement_joined, jaccard,
                      _spearman(sa, sb), gain, ratio, notes)


def check_gates(cmp: Comparison, gates: Gates = DEFAULT_GATES) -> list[GateResult]:
    """Each configured gate's value, limit and verdict."""
    out: list[GateResult] = []

    def gate(name: str, value: float | None, limit: float | None, ok: bool | None, missing: str) -> None:
        if limit is None:
            return
        if value is None:
            out.append(GateResult(name, None, limit, False, missing))
        else:
            out.append(GateResult(name, value, limit, bool(ok), f"{value:.4g} {'meets' if ok else 'misses'} {limit:g}"))

    gate("min_records", cmp.challenger.records, gates.min_records,
         gates.min_records is not None and cmp.challenger.records >= gates.min_records, "")
    gate("min_agreement", cmp.agreement, gates.min_agreement,
         cmp.agreement is not None and gates.min_agreement is not None and cmp.agreement >= gates.min_agreement,
         "agreement unknown: no records captured for both roles with a champion sample (run --rollout shadow)")
    gate("min_jaccard", cmp.jaccard, gates.min_jaccard,
         cmp.jaccard is not None and gates.min_jaccard is not None and cmp.jaccard >= gates.min_jaccard,
         "alert overlap unknown: no records captured for both roles (run --rollout shadow)")
    labelled = min(cmp.champion.labelled_flagged, cmp.challenger.labelled_flagged)
    gate("min_labelled", labelled, gates.min_labelled,
         gates.min_labelled is not None and labelled >= gates.min_labelled, "")
    gate("min_precision_gain", cmp.precision_gain, gates.min_precision_gain,
         cmp.precision_gain is not None and gates.min_precision_gain is not None
         and cmp.precision_gain >= gates.min_precision_gain - 1e-12,
         "precision unknown: a role has no labelled flagged records")
    gate("max_latency_ratio", cmp.latency_ratio, gates.max_latency_ratio,
         cmp.latency_ratio is not None and gates.max_latency_ratio is not None and cmp.latency_ratio <= gates.max_latency_ratio,
         "latency unknown: a role's captures carry no latency")
    return out


@dataclass
class PromoteResult:
    model: str
    from_version: int
    to_version: int
    promoted: bool
    forced: bool
    gates: list[GateResult]
    comparison: Comparison | None
    error: str | None = None      # why the comparison could not be made (forced promotions go on)

    @property
    def failed(self) -> list[GateResult]:
        return [g for g in self.gates if not g.passed]

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "from_version": self.from_version, "to_version": self.to_version, "promoted": self.promoted,
                "forced": self.forced, "gates": [asdict(g) for g in self.gates], "failed": [g.name for g in self.failed],
                "comparison": self.comparison.to_dict() if self.comparison else None, "error": self.error}


def promote(registry: Registry, store: Any, model: str, gates: Gates = DEFAULT_GATES, *, force: bool = False) -> PromoteResult:
    """Move ``champion`` to the challenger's version when every gate passes (or ``force``);
    audited either way (action ``promote``, with the gate results)."""
    champ_v, chal_v = _versions(registry, model)
    cmp: Comparison | None = None
    error = None
    try:
        cmp = compare(registry, store, model)
    except ValueError as e:
        if not force:
            raise
        error = str(e)
    results = check_gates(cmp, gates) if cmp is not None else []
    ok = force or all(g.passed for g in results)
    if ok:
        registry.set_alias(model, CHAMPION, chal_v)
    registry.record(model, PROMOTE_ACTION, alias=CHAMPION, version=chal_v if ok else champ_v, previous=champ_v, candidate=chal_v,
                    promoted=ok, forced=force, failed=[g.name for g in results if not g.passed],
                    gates={g.name: {"value": g.value, "limit": g.limit, "passed": g.passed} for g in results})
    return PromoteResult(model, champ_v, chal_v, ok, force, results, cmp, error)


def champion_history(registry: Registry, model: str) -> list[int]:
    """The champion versions still to return to, oldest first, replayed from the audit log: each
    move of the alias pushes its version; a rollback forgets the version it undid."""
    stack: list[int] = []
    for r in registry.audit(model):
        action = r.get("action")
        if action == "alias" and r.get("alias") == CHAMPION and isinstance(r.get("version"), int):
            if not stack or stack[-1] != r["version"]:
                stack.append(r["version"])
        elif action == ROLLBACK_ACTION and stack and stack[-1] == r.get("to"):
            stack.pop()  # the move this rollback made
            if stack and stack[-1] == r.get("from"):
                stack.pop()  # the version it undid
            if not stack or stack[-1] != r["to"]:
                stack.append(r["to"])
    return stack


def rollback(registry: Registry, model: str) -> tuple[int, int]:
    """Return ``champion`` to the previous champion version; ``(from, to)``. Audited (action
    ``rollback``). Raises ``InvalidInputError`` (a ``ValueError``) when there is no previous champion."""
    current = registry.resolve(model, CHAMPION)
    stack = champion_history(registry, model)
    if len(stack) < 2 or stack[-1] != current:
        raise InvalidInputError(f"no previous champion of {model!r} to return to (champion is version {current}; "
                                f"history: {stack or 'empty'}); use outlierd registry alias to choose a version")
    target = stack[-2]
    registry.resolve(model, target)  # the version must still exist
    registry.set_alias(model, CHAMPION, target)
    registry.record(model, ROLLBACK_ACTION, alias=CHAMPION, **{"from": current, "to": target})
    return current, target
