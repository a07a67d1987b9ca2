"""The PostgreSQL feedback store (monitoring/store_pg.py) against the SQLite one: the same writes give
the same answers to every read; migrations applied once by replicas opening at once; many writers
at once; a server stopped and started again (captures fail fast and are not retried, labels are
refused, never half-stored, and the store works again without being reopened)."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from outlierd.core.errors import StoreUnavailableError
from outlierd.monitoring.quality import from_store
from outlierd.monitoring.store import LABELS, LabelRow, Store, open_store, store_exists, store_location

psycopg = pytest.importorskip("psycopg")


def _fill(store, rng, n=600, d=5):
    """The same captures and labels, in the same order, into ``store``; returns the labels written."""
    ids = [f"r{i}" for i in rng.permutation(n)]
    X = rng.standard_normal((n, d)).astype(np.float32)
    scores = rng.random(n)
    flagged = scores > 0.8
    sampled = ~flagged & (rng.random(n) < 0.3)
    half = n // 2
    store.add_predictions("m", 1, "champion", ids[:half], X[:half], scores[:half], flagged[:half], sampled[:half], 12.5, 1000.0,
                          sample_rate=0.3)
    lat = rng.random(n - half) * 100
    lat[::7] = np.nan
    store.add_predictions("m", 2, "champion", ids[half:], X[half:], scores[half:], flagged[half:], sampled[half:], lat,
                          1000.0 + np.arange(n - half) // 50, sample_rate=np.where(np.arange(n - half) % 3 == 0, np.nan, 0.25))
    store.add_predictions("m", 2, "challenger", ids[half:], X[half:] * 2, scores[half:] / 2, flagged[half:], sampled[half:], 3.0, 1001.0)
    store.add_predictions("other", 1, "champion", ids[:10], X[:10], scores[:10], flagged[:10], sampled[:10], 1.0, 999.0)
    labels = [LabelRow(f"r{int(rng.integers(n + 50))}", LABELS[int(rng.integers(2))], f"rev{i % 3}", f"note {i}", ts=2000.0 + i)
              for i in range(300)]
    known = store.add_labels("m", labels[:200])
    known += store.add_labels("m", labels[200:])
    return labels, known


def test_same_writes_same_answers_as_sqlite(tmp_path, pg_url, rng):
    seed = int(rng.integers(1 << 31))
    lite, pg = open_store(tmp_path / "fb.sqlite"), open_store(pg_url)
    assert isinstance(pg, Store) and type(pg).__name__ == "PostgresStore"
    try:
        out_l = _fill(lite, np.random.default_rng(seed))
        out_p = _fill(pg, np.random.default_rng(seed))
        assert out_l == out_p  # labels and their known_record flags
        assert lite.labels("m") == pg.labels("m")
        for kw in ({}, {"role": "champion"}, {"role": "challenger", "version": 2}, {"version": 1}, {"features": False}):
            if kw.get("version") is None and kw.get("features", True) and kw.get("role") != "challenger":
                kw = {**kw, "version": 1}  # features of one width per read (both are 5 wide; keep the reads like callers do)
            a, b = lite.predictions("m", **kw), pg.predictions("m", **kw)
            assert a.record_id == b.record_id and a.role == b.role
            for f in ("version", "score", "flagged", "sampled", "ts", "latency_us", "sample_rate", "X"):
                np.testing.assert_array_equal(getattr(a, f), getattr(b, f), err_msg=f"{f} {kw}")
        for role in ("champion", "challenger"):
            Xa, ya, ia = lite.labelled("m", role=role)
            Xb, yb, ib = pg.labelled("m", role=role)
            assert ia == ib and len(ia) > 10
            np.testing.assert_array_equal(Xa, Xb)
            np.testing.assert_array_equal(ya, yb)
            assert lite.quality_inputs("m", role) == pg.quality_inputs("m", role)
        ids = [f"r{i}" for i in range(0, 700, 7)]
        assert lite.known("m", ids) == pg.known("m", ids) and lite.known("other", ids) == pg.known("other", ids)
        assert lite.counts("m") == pg.counts("m")
        assert from_store(lite, "m") == from_store(pg, "m")
        # retention (oracle: every unlabelled prediction older than the cutoff goes, labelled ones stay;
        # SQLite walks in capture order and stops at the first young one, so it is not the oracle here)
        labelled = {r.record_id for r in pg.labels("m")}
        before = {m: pg.predictions(m, features=False) for m in ("m", "other")}
        doomed = {m: sum(1 for rid, t in zip(p.record_id, p.ts) if t < 1003.0 and (m != "m" or rid not in labelled))
                  for m, p in before.items()}
        assert pg.prune(max_age_s=10.0, now=1013.0) == sum(doomed.values()) > 0
        after = pg.predictions("m", features=False)
        assert len(after) == len(before["m"]) - doomed["m"] and np.all((after.ts >= 1003.0) | np.isin(after.record_id, list(labelled)))
    finally:
        lite.close()
        pg.close()


def test_store_location_keeps_urls(tmp_path, pg_url):
    assert store_location(pg_url, tmp_path) == pg_url and store_exists(pg_url)
    assert store_location(None, tmp_path) == tmp_path / "feedback.sqlite" and not store_exists(tmp_path / "feedback.sqlite")


def test_replicas_opening_at_once_migrate_once_and_write_together(pg_url, rng):
    n_threads, per = 6, 40
    stores, errors = [], []
    barrier = threading.Barrier(n_threads)

    def replica(k: int) -> None:
        try:
            barrier.wait()
            s = open_store(pg_url)  # each migrates under the advisory lock
            stores.append(s)
            for j in range(per):
                rid = f"w{k}-{j}"
                s.add_predictions("m", 1, "champion", [rid], np.full((1, 3), k, np.float32), np.array([0.9]), np.array([True]),
                                  np.array([False]), 1.0)
                assert s.add_labels("m", [LabelRow(rid, "anomaly", f"w{k}")]) == [True]
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=replica, args=(k,)) for k in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert not errors, errors
        with psycopg.connect(pg_url) as c:
            assert c.execute("SELECT version FROM outlierd_schema").fetchall() == [(1,)]
        s = stores[0]
        assert s.counts("m") == {"predictions": n_threads * per, "labels": n_threads * per}
        assert sorted(r.record_id for r in s.labels("m")) == sorted(f"w{k}-{j}" for k in range(n_threads) for j in range(per))
        totals = s.quality_inputs("m")
        assert totals["captured_flagged"] == n_threads * per
    finally:
        for s in stores:
            s.close()


def test_newer_schema_refused(pg_url):
    open_store(pg_url).close()
    with psycopg.connect(pg_url, autocommit=True) as c:
        c.execute("INSERT INTO outlierd_schema VALUES (99, 0)")
    with pytest.raises(StoreUnavailableError, match="schema version 99"):
        open_store(pg_url)


def test_bad_label_named_and_nothing_stored(pg_url):
    s = open_store(pg_url)
    try:
        with pytest.raises(ValueError, match="label 1 .*record_id 'b'"):
            s.add_labels("m", [LabelRow("a", "anomaly"), LabelRow("b", "weird")])
        assert s.labels("m") == []
    finally:
        s.close()


def test_server_stopped_and_started_again(pg_cluster):
    url = pg_cluster.url
    s = open_store(url)
    try:
        s.add_labels("m", [LabelRow("before", "anomaly")])
        pg_cluster.stop()
        X = np.zeros((2, 3), np.float32)
        with pytest.raises(StoreUnavailableError, match="unavailable"):
            s.add_predictions("m", 1, "champion", ["a", "b"], X, np.array([0.1, 0.9]), np.array([False, True]), np.array([True, False]), 1.0)
        with pytest.raises(StoreUnavailableError):
            s.add_labels("m", [LabelRow("during", "normal")])
        assert s.failures >= 2 and s.retries >= 1  # a refused connection is retried (nothing was sent), then given up
        pg_cluster.start()
        # the same store object works again: a new connection per thread
        assert s.add_labels("m", [LabelRow("after", "normal")]) == [False]
        assert [r.record_id for r in s.labels("m")] == ["before", "after"]  # the refused label was not stored
    finally:
        s.close()


def test_review_queue_against_an_oracle(tmp_path, pg_url, rng):
    seed = int(rng.integers(1 << 31))
    for store in (open_store(tmp_path / "fb.sqlite"), open_store(pg_url)):
        try:
            _fill(store, np.random.default_rng(seed))
            p = store.predictions("m", role="champion", features=False)
            labelled = {r.record_id for r in store.labels("m")}
            for since, limit in ((None, 10_000), (1002.0, 10_000), (None, 7)):
                latest: dict[str, int] = {}
                for i, rid in enumerate(p.record_id):
                    latest[rid] = i  # the latest champion capture of each record id
                want = [p.record_id[i] for i in sorted(latest.values(), reverse=True)
                        if p.flagged[i] and p.record_id[i] not in labelled and (since is None or p.ts[i] >= since)][:limit]
                got = store.unlabelled_alerts("m", since=since, limit=limit)
                assert got.record_id == want and len(want) > 0, (store, since, limit)
                assert got.X.shape == (len(want), 5) and np.all(got.flagged)
        finally:
            store.close()
