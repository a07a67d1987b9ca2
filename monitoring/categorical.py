"""Data quality and drift of categorical inputs (raw events' category columns).

Reference: a column's value shares in the training events (what the feature engine learned, in the
model's ``features.json``). A window of served events is compared on the reference's ``top`` most
frequent values plus one "other" bucket (every other value, seen in training or not):

* ``unseen``: the share of the window's events whose value was not in training at all;
* ``psi``: the population stability index of the window's shares against the reference's, on those
  ``top + 1`` buckets (``monitoring.drift.psi``).

Values are compared by the engine's 64-bit hashes, so the monitor costs a sorted lookup per event.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from outlierd.core.features.events import hash_text
from outlierd.core.features.kernel import bucket_counts, hash_index

from .drift import psi

DEFAULT_TOP = 20


@dataclass(frozen=True)
class CategoryDrift:
    column: str
    events: int
    unseen: float  # share of events with a value not seen in training
    psi: float  # on the top values + "other"
    shares: dict[str, float]  # the window's share per top value, and "other"


class CategoryReference:
    """One column's reference: the top values' hashes and shares, the other bucket's share, and
    every training value's hash (for the unseen rate)."""

    def __init__(self, column: str, shares: dict[str, float], top: int = DEFAULT_TOP) -> None:
        self.column = column
        ordered = sorted(shares.items(), key=lambda kv: (-kv[1], kv[0]))
        self.top_values = [v for v, _ in ordered[:top]]
        top_hashes = hash_text(self.top_values)
        ref = np.array([s for _, s in ordered[:top]], dtype=np.float64)
        self.reference = np.append(ref, max(0.0, 1.0 - ref.sum()))
        self._known = np.sort(hash_text(list(shares)))
        self._top_index = hash_index(top_hashes)  # positions in reference order
        self._known_index = hash_index(self._known)

    def bucket_counts(self, hashes: np.ndarray) -> tuple[np.ndarray, int]:
        """Events per bucket (top values in reference order, then other) and events unseen in training."""
        k = len(self.top_values)
        counts = np.zeros(k + 1, dtype=np.int64)
        if hashes.size == 0:
            return counts, 0
        # one compiled pass (two hash-table probes an event) rather than several NumPy temporaries
        unseen = bucket_counts(*self._top_index, *self._known_index, np.ascontiguousarray(hashes, dtype=np.int64), counts)
        return counts, int(unseen)

    def drift(self, counts: np.ndarray, unseen: int) -> CategoryDrift:
        n = int(counts.sum())
        shares = counts / n if n else np.zeros_like(counts, dtype=np.float64)
        names = [*self.top_values, "other"]
        return CategoryDrift(self.column, n, unseen / n if n else 0.0, psi(shares, self.reference) if n else 0.0,
                             dict(zip(names, map(float, shares))))


class CategoryMonitor:
    """Tumbling windows of ``window`` events per column; ``observe`` returns the drift of each
    window that closed (to set gauges with)."""

    def __init__(self, references: dict[str, dict[str, float]], top: int = DEFAULT_TOP, window: int = 10_000) -> None:
        self.refs = {c: CategoryReference(c, shares, top) for c, shares in references.items()}
        self.window = window
        # a window's hashes are kept (8 bytes an event) and counted once, when it closes: per message
        # only an append, which matters for small messages
        self._pending: dict[str, list[np.ndarray]] = {c: [] for c in self.refs}
        self._n = dict.fromkeys(self.refs, 0)

    def observe(self, hashes_by_column: dict[str, np.ndarray]) -> list[CategoryDrift]:
        closed = []
        for column, hashes in hashes_by_column.items():
            ref = self.refs.get(column)
            if ref is None:
                continue
            self._pending[column].append(hashes)
            self._n[column] += hashes.shape[0]
            if self._n[column] >= self.window:
                closed.append(ref.drift(*ref.bucket_counts(np.concatenate(self._pending[column]))))
                self._pending[column] = []
                self._n[column] = 0
        return closed

    def report(self, hashes_by_column: dict[str, np.ndarray]) -> list[CategoryDrift]:
        """The drift of one batch of events (a file, offline) per column, regardless of the window."""
        out = []
        for column, hashes in hashes_by_column.items():
            ref = self.refs.get(column)
            if ref is not None:
                out.append(ref.drift(*ref.bucket_counts(hashes)))
        return out
