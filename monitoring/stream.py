"""Streaming drift in the workers: panes of histograms, a sliding window over the last panes.

A pane closes after ``pane_records`` records, or after ``pane_seconds`` of wall-clock time (panes
then align across processes: pane id = floor(time / pane_seconds)). The window is the merge of the
last ``window_panes`` panes (1: tumbling windows). On each pane close the window is evaluated and
``on_window`` is called with the result.

With several worker processes each worker also writes its window's panes to
``<dir>/drift-<pid>.npz``; ``merge_dir`` sums the same panes of every worker, which is exactly
what one process seeing all the records would hold (histograms merge by addition).
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from outlierd.core.errors import InvalidInputError

from .drift import QUALITY_REASONS, DriftConfig, DriftResult, Reference, Window, evaluate, observe


class StreamMonitor:
    def __init__(self, ref: Reference, config: DriftConfig = DriftConfig(), *, pane_records: int | None = None,
                 pane_seconds: float | None = None, window_panes: int = 1, share_dir: str | os.PathLike | None = None,
                 on_window: Callable[[DriftResult, Window], None] | None = None, clock: Callable[[], float] = time.time,
                 share_tag: int = 0):
        if pane_records is not None and pane_seconds is not None:
            raise InvalidInputError("set one of pane_records and pane_seconds, not both")
        if pane_records is None and pane_seconds is None:
            pane_records = 10_000
        if window_panes < 1:
            raise InvalidInputError(f"window_panes must be >= 1; got {window_panes}")
        self.ref, self.config = ref, config
        self.pane_records, self.pane_seconds, self.window_panes = pane_records, pane_seconds, window_panes
        self.share_dir = Path(share_dir) if share_dir else None
        self.share_tag = share_tag  # e.g. the model version: only panes of one tag are merged
        self.on_window = on_window
        self.clock = clock
        self.closed: deque[tuple[int, Window]] = deque(maxlen=window_panes)
        self.pane = Window.empty(ref)
        self.pane_id = self._time_pane() if pane_seconds else 0
        self.last: DriftResult | None = None
        self.quality_total = np.zeros_like(self.pane.quality)  # cumulative, for counters

    def _time_pane(self) -> int:
        return int(self.clock() // self.pane_seconds)  # type: ignore[operator]

    def observe(self, X: np.ndarray, scores: np.ndarray, threshold: float) -> None:
        """Add a scored batch; closes panes as they fill (records) or as time passes."""
        if self.pane_seconds:
            self.tick()
            self._observe(X, scores, threshold)
            return
        start = 0
        n = X.shape[0]
        while start < n:  # split a batch at pane boundaries so windows are exact
            take = min(n - start, self.pane_records - self.pane.records)  # type: ignore[operator]
            self._observe(X[start:start + take], scores[start:start + take], threshold)
            start += take
            if self.pane.records >= self.pane_records:  # type: ignore[operator]
                self._close(self.pane_id + 1)

    def _observe(self, X: np.ndarray, scores: np.ndarray, threshold: float) -> None:
        before = self.pane.quality.copy()
        observe(self.pane, self.ref, X, scores, threshold)
        self.quality_total += self.pane.quality - before

    def add(self, window: Window) -> None:
        """Add histograms counted elsewhere to the current pane (time-based panes only: they carry
        no record boundary)."""
        p = self.pane
        p.counts += window.counts
        p.missing += window.missing
        p.quality += window.quality
        p.score_counts += window.score_counts
        p.records += window.records
        p.alerts += window.alerts
        self.quality_total += window.quality

    def tick(self) -> None:
        """Close the pane if its time is up (time-based panes); call it periodically when idle."""
        if self.pane_seconds:
            now = self._time_pane()
            if now != self.pane_id:
                self._close(now)

    def window(self) -> Window:
        merged = Window.empty(self.ref)
        for _, w in self.closed:
            merged = merged.merge(w)
        return merged

    def _close(self, next_id: int) -> None:
        self.closed.append((self.pane_id, self.pane))
        self.pane, self.pane_id = Window.empty(self.ref), next_id
        window = self.window()
        self.last = evaluate(window, self.ref, self.config)
        if self.share_dir is not None:
            self._share()
        if self.on_window is not None:
            self.on_window(self.last, window)

    def _share(self) -> None:
        assert self.share_dir is not None
        # Any: np.savez(**arrays) would otherwise be read as possibly passing allow_pickle
        arrays: dict[str, Any] = {"pane_ids": np.array([pid for pid, _ in self.closed], dtype=np.int64),
                                         "tag": np.array(self.share_tag, dtype=np.int64)}
        for i, (_, w) in enumerate(self.closed):
            arrays.update({f"{i}_{k}": v for k, v in w.to_arrays().items()})
        tmp = self.share_dir / f".drift-{os.getpid()}-{uuid.uuid4().hex}.npz"
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, self.share_dir / f"drift-{os.getpid()}.npz")


def shared_tags(share_dir: str | os.PathLike) -> list[int]:
    """The tags (model versions) of the panes workers have shared."""
    tags = set()
    for path in Path(share_dir).glob("drift-*.npz"):
        try:
            with np.load(path, allow_pickle=False) as z:
                tags.add(int(z["tag"]))
        except (OSError, ValueError, KeyError):
            continue
    return sorted(tags)


def merge_dir(share_dir: str | os.PathLike, ref: Reference, window_panes: int, tag: int | None = None) -> Window:
    """Merge every worker's shared panes (of ``tag`` only, when given): the last ``window_panes``
    pane ids seen by any worker."""
    panes: dict[int, Window] = {}
    for path in Path(share_dir).glob("drift-*.npz"):
        try:
            with np.load(path, allow_pickle=False) as z:
                a = {k: z[k] for k in z.files}
        except (OSError, ValueError):
            continue  # a worker is replacing its file right now
        if tag is not None and int(a.get("tag", -1)) != tag:
            continue
        for i, pid in enumerate(a["pane_ids"].tolist()):
            w = Window.from_arrays({k: a[f"{i}_{k}"] for k in ("counts", "missing", "quality", "score_counts", "records", "alerts")})
            panes[pid] = panes[pid].merge(w) if pid in panes else w
    merged = Window.empty(ref)
    for pid in sorted(panes)[-window_panes:]:
        merged = merged.merge(panes[pid])
    return merged


class ServingMonitor:
    """Drift and data quality of one served model version, fed by the scoring threads.

    Single worker: sets the drift gauges itself at every pane close. Several workers
    (``share_dir`` set): shares its panes for the parent's merged view and sets no drift gauge.
    Data-quality counters are plain counters, summed across workers by prometheus-client.
    """

    def __init__(self, name: str, ref: Reference, metrics=None, *, config: DriftConfig = DriftConfig(),
                 pane_records: int | None = None, pane_seconds: float | None = 15.0, window_panes: int = 4,
                 share_dir: str | os.PathLike | None = None, version: int = 0):
        self.name, self.metrics = name, metrics
        on_window = None
        if metrics is not None and share_dir is None:
            def on_window(result: DriftResult, _w: Window) -> None:
                metrics.drift.set(name, result)
        self.stream = StreamMonitor(ref, config, pane_records=pane_records or None,
                                    pane_seconds=None if pane_records else pane_seconds, window_panes=window_panes,
                                    share_dir=share_dir, on_window=on_window, share_tag=version)
        self._exported = np.zeros_like(self.stream.quality_total)
        self._lock = threading.Lock()
        self._local = threading.local()
        self._threads: list[tuple[Window, threading.Lock]] = []
        # compile (or load from cache) the observe kernel for the dtypes requests bring, off the hot path
        scratch = Window.empty(ref)
        zeros = np.zeros((1, ref.n_features))
        for X in (zeros, zeros.astype(np.float32), np.frombuffer(zeros.astype("<f4").tobytes(), dtype="<f4").reshape(1, -1)):
            observe(scratch, ref, X, np.zeros(1), 1.0)
        if metrics is not None and ref.alert_rate is not None and share_dir is None:
            metrics.drift.expected_alert_rate.labels(name).set(ref.alert_rate)

    def observe(self, X: np.ndarray, scores: np.ndarray, threshold: float) -> None:
        if self.stream.pane_seconds:
            # Time panes: each scoring thread counts into its own histograms (its own, uncontended
            # lock); tick() folds them into the pane. Per batch that is one kernel call and no
            # shared state, so scoring threads neither queue nor hold the GIL for bookkeeping.
            tw = getattr(self._local, "tw", None)
            if tw is None:
                tw = self._local.tw = (Window.empty(self.stream.ref), threading.Lock())
                with self._lock:
                    self._threads.append(tw)
            with tw[1]:
                observe(tw[0], self.stream.ref, X, scores, threshold)
            return
        with self._lock:
            self.stream.observe(X, scores, threshold)
            self._export_quality()

    def tick(self) -> None:
        """Fold the threads' counts into the pane, close it if its time is up, export quality
        counts. The server calls it every reload interval (250 ms)."""
        with self._lock:
            for window, lock in self._threads:
                with lock:
                    if window.records:
                        self.stream.add(window)
                        for a in (window.counts, window.missing, window.quality, window.score_counts):
                            a.fill(0)
                        window.records = window.alerts = 0
            self.stream.tick()
            self._export_quality()

    def _export_quality(self) -> None:
        delta = self.stream.quality_total - self._exported
        if self.metrics is None or not delta.any():
            return
        self._exported = self.stream.quality_total.copy()
        names = self.stream.ref.feature_names
        for j, q in zip(*np.nonzero(delta)):
            self.metrics.data_quality.labels(self.name, names[j], QUALITY_REASONS[q]).inc(int(delta[j, q]))
