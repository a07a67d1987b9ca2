"""Retention of the capture store (issue 14 item 6).

Before: captures grew without limit (+96 MB a minute at 750k records/s, never deleted). Now the
capture process deletes, between frames, predictions older than ``--capture-max-age-s`` and the
oldest ones while the store is over ``--capture-max-bytes``; labelled records and their
predictions are always kept; the deletions are counted (``outlierd_capture_pruned_total``).
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from outlierd.monitoring.capture import CaptureWriter
from outlierd.monitoring.capture_proc import Retention
from outlierd.monitoring.metrics import ServiceMetrics
from outlierd.monitoring.store import LabelRow, open_store

D = 16
DAY = 86400.0


def _capture(store, ids, ts, version=1):
    n = len(ids)
    rng = np.random.default_rng(len(ids))
    flagged = np.zeros(n, dtype=bool)
    store.add_predictions("m", version, "champion", ids, rng.standard_normal((n, D)).astype(np.float32), rng.random(n), flagged,
                          ~flagged, 5.0, ts, sample_rate=0.01)


@pytest.fixture
def store(tmp_path):
    s = open_store(tmp_path / "fb.sqlite")
    yield s
    s.close()


def test_prune_by_age_keeps_labelled_and_recent(store):
    now = 1_000 * DAY
    for day in range(10):  # ten daily writes of 50 records, oldest first
        _capture(store, [f"d{day}-{i}" for i in range(50)], now - (10 - day) * DAY)
    store.add_labels("m", [LabelRow("d0-3", "anomaly"), LabelRow("d1-7", "normal"), LabelRow("d9-1", "anomaly")])
    deleted = store.prune(max_age_s=3.5 * DAY, now=now, chunk=64)  # small chunks: the walk crosses batches
    kept = set(store.predictions("m", features=False).record_id)
    # days 0..6 are older than 3.5 days: 7 * 50 records, less the two labelled ones
    assert deleted == 7 * 50 - 2
    assert kept == {"d0-3", "d1-7"} | {f"d{d}-{i}" for d in range(7, 10) for i in range(50)}
    assert store.known("m", ["d0-3", "d1-7", "d0-4"]) == [True, True, False]
    assert [r.record_id for r in store.labels("m")] == ["d0-3", "d1-7", "d9-1"]  # labels are never deleted
    assert store.prune(max_age_s=3.5 * DAY, now=now) == 0  # nothing left to do
    # batches left empty are gone; those holding a labelled record stay
    conn = store._conn()
    assert conn.execute("SELECT COUNT(*) FROM capture_batches").fetchone()[0] == 2 + 3
    store.add_labels("m", [LabelRow("d7-0", "anomaly")])
    assert sorted(store.labelled("m")[2]) == ["d0-3", "d1-7", "d7-0", "d9-1"]  # every labelled record still has its features


def test_prune_by_size_stops_the_growth(store):
    t0 = time.time()
    for k in range(40):
        _capture(store, [f"b{k}-{i}" for i in range(500)], t0 + k)
    store.add_labels("m", [LabelRow("b0-0", "anomaly")])
    full = store.live_bytes()
    limit = full // 3
    deleted = store.prune(max_bytes=limit, chunk=1000)
    assert 0 < deleted < 40 * 500 and store.live_bytes() <= limit
    ids = store.predictions("m", features=False).record_id
    assert "b0-0" in ids and "b39-499" in ids and "b0-1" not in ids  # oldest unlabelled first, the newest kept
    # new captures reuse the freed pages: the file does not grow back past its size
    size = store.path.stat().st_size
    for k in range(40, 50):
        _capture(store, [f"b{k}-{i}" for i in range(500)], t0 + k)
    assert store.path.stat().st_size <= size * 1.05


def test_the_capture_process_enforces_it_and_counts(tmp_path):
    path = tmp_path / "fb.sqlite"
    old = open_store(path)
    _capture(old, [f"old-{i}" for i in range(100)], time.time() - 2 * DAY)
    old.add_labels("m", [LabelRow("old-5", "anomaly")])
    old.close()
    metrics = ServiceMetrics(registry=CollectorRegistry())

    class H:  # what capture_batch needs of a handle
        name, version, alias = "m", 1, "champion"

    writer = CaptureWriter.in_process(path, sample_rate=1.0, metrics=metrics, retention=Retention(max_age_s=DAY, every_s=0.0)).start()
    try:
        X = np.random.default_rng(0).standard_normal((10, D)).astype(np.float32)
        writer.capture_batch(H, "champion", X, np.zeros(10), 1.0, (([f"new-{i}" for i in range(10)], 1),))
        assert writer.flush(30)
        deadline = time.monotonic() + 30
        while writer.pruned < 99:
            assert time.monotonic() < deadline, writer.pruned
            writer.capture_batch(H, "champion", X, np.zeros(10), 1.0, (([f"n{time.monotonic()}-{i}" for i in range(10)], 2),))
            writer.flush(30)
    finally:
        writer.close()
    assert writer.pruned == 99
    assert metrics.registry.get_sample_value("outlierd_capture_pruned_total") == 99
    kept = set(open_store(path).predictions("m", features=False).record_id)
    assert "old-5" in kept and "old-6" not in kept and "new-3" in kept
