"""The review queue: captured alerts that no reviewer has labelled yet (``outlierd feedback queue``,
``GET /v1/models/{name}/review-queue``), read from either store."""

from __future__ import annotations

from typing import Any

import numpy as np

from outlierd.core.errors import InvalidInputError, OutlierdError
from outlierd.core.registry import Registry


def review_queue(registry: Registry, store: Any, model: str, *, since: float | None = None, limit: int = 50,
                 top_k: int = 3) -> list[dict[str, Any]]:
    """Captured alerts of ``model`` without a label, newest first: ``{"record_id", "time", "score",
    "version", "top_features": [{"name", "contribution"}]}`` (features from the version that scored
    it; none when that version cannot explain, e.g. deleted)."""
    if limit < 1 or top_k < 0:
        raise InvalidInputError(f"--limit must be >= 1 and --top-k >= 0; got {limit} and {top_k}")
    p = store.unlabelled_alerts(model, since=since, limit=limit)
    out = [{"record_id": rid, "time": float(t), "score": float(sc), "version": int(v), "top_features": []}
           for rid, t, sc, v in zip(p.record_id, p.ts, p.score, p.version)]
    if top_k:
        for v in sorted(set(p.version.tolist())):
            idx = np.flatnonzero(p.version == v)
            try:
                m = registry.load(model, int(v))
                feat, contrib = m.explain(p.X[idx].astype(np.float64), min(top_k, m.n_features))
            except (OutlierdError, ValueError, NotImplementedError, OSError):
                continue  # listed without features: the queue stands alone
            for row, i in enumerate(idx):
                out[i]["top_features"] = [{"name": m.feature_names[j], "contribution": float(c)} for j, c in zip(feat[row], contrib[row])]
    return out
