"""The feedback store (monitoring/store.py) on real SQLite files: WAL mode, durable labels, round
trips of predictions and labels with random arrays, ``labelled`` against a plain-Python oracle, and
two processes writing the same file at once."""

from __future__ import annotations

import multiprocessing
import sqlite3

import numpy as np
import pytest

from outlierd.monitoring.store import LABELS, LabelRow, Predictions, SQLiteStore, Store, default_store_path, open_store


@pytest.fixture
def store(tmp_path):
    s = open_store(tmp_path / "fb.sqlite")
    yield s
    s.close()


def _random_predictions(rng, n: int, d: int, prefix: str = "r"):
    ids = [f"{prefix}{i}" for i in rng.permutation(n)]
    X = rng.standard_normal((n, d)).astype(np.float32)
    scores = rng.random(n)
    flagged = scores > 0.8
    sampled = ~flagged & (rng.random(n) < 0.3)
    return ids, X, scores, flagged, sampled


def test_wal_mode_and_schema(tmp_path):
    path = tmp_path / "fb.sqlite"
    s = open_store(path)
    assert isinstance(s, Store) and isinstance(s, SQLiteStore)
    assert s.journal_mode() == "wal"
    s.close()
    with sqlite3.connect(path) as c:  # WAL is a property of the file, seen by any other connection
        assert c.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        tables = {r[0] for r in c.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"predictions", "labels"} <= tables
    assert default_store_path(tmp_path) == tmp_path / "feedback.sqlite"


def test_labels_are_committed_fsynced_and_visible_to_another_connection(store, rng):
    rows = [LabelRow(f"id-{i}", LABELS[int(rng.integers(2))], reviewer=f"rev{i % 3}", note=f'n,"{i}"\nline') for i in range(50)]
    known = store.add_labels("m", rows)
    assert known == [False] * 50  # nothing captured yet: stored anyway, reported unknown
    # the label transaction ran with synchronous=FULL (WAL fsynced at commit)
    assert store._conn().execute("PRAGMA synchronous").fetchone()[0] == 2
    # a fresh connection (another process would see the same) reads every row right after the call returns
    with sqlite3.connect(store.path) as c:
        got = c.execute("SELECT record_id, label, reviewer, note FROM labels WHERE model = 'm' ORDER BY id").fetchall()
    assert got == [(r.record_id, r.label, r.reviewer, r.note) for r in rows]


def test_labels_round_trip_arrival_order_duplicates_kept(store, rng):
    rows = []
    for i in range(200):
        rid = f"r{int(rng.integers(40))}"  # many duplicates: disagreement needs them all
        rows.append(LabelRow(rid, LABELS[int(rng.integers(2))], f"rev{int(rng.integers(4))}", "ü ñ ✓" if i % 7 == 0 else ""))
    for k in range(0, 200, 37):  # several transactions
        store.add_labels("m", rows[k:k + 37])
    store.add_labels("other", [LabelRow("r1", "normal")])
    got = store.labels("m")
    assert [(r.record_id, r.label, r.reviewer, r.note) for r in got] == [(r.record_id, r.label, r.reviewer, r.note) for r in rows]
    assert all(r.ts > 0 for r in got) and [r.ts for r in got] == sorted(r.ts for r in got)
    assert [r.record_id for r in store.labels("other")] == ["r1"]


@pytest.mark.parametrize("bad, match", [(LabelRow("", "anomaly"), "record_id is empty"),
                                        (LabelRow("a", "spam"), "label must be one of anomaly, normal; got 'spam'")])
def test_invalid_labels_store_nothing(store, bad, match):
    with pytest.raises(ValueError, match=match):
        store.add_labels("m", [LabelRow("ok", "normal"), bad])
    assert store.labels("m") == []


def test_predictions_round_trip_with_real_arrays(store, rng):
    n, d = 300, 7
    ids, X, scores, flagged, sampled = _random_predictions(rng, n, d)
    lat = rng.random(n) * 50
    ts = 1.7e9 + np.arange(n, dtype=np.float64)
    store.add_predictions("m", 3, "champion", ids[:200], X[:200], scores[:200], flagged[:200], sampled[:200], lat[:200], ts[:200],
                          sample_rate=0.25)
    store.add_predictions("m", 4, "challenger", ids[200:], X[200:], scores[200:], flagged[200:], sampled[200:], 12.5, ts[200:])
    p = store.predictions("m")
    assert isinstance(p, Predictions) and len(p) == n
    assert p.record_id == ids
    np.testing.assert_array_equal(p.X, X)  # float32 bit for bit
    assert p.X.dtype == np.float32 and p.version.dtype == np.int64 and p.score.dtype == np.float64
    np.testing.assert_array_equal(p.score, scores)
    np.testing.assert_array_equal(p.flagged, flagged)
    np.testing.assert_array_equal(p.sampled, sampled)
    np.testing.assert_array_equal(p.ts, ts)
    np.testing.assert_array_equal(p.latency_us, np.concatenate([lat[:200], np.full(100, 12.5)]))
    np.testing.assert_array_equal(p.version, [3] * 200 + [4] * 100)
    assert p.role == ["champion"] * 200 + ["challenger"] * 100
    np.testing.assert_array_equal(p.sample_rate[:200], 0.25)
    assert np.isnan(p.sample_rate[200:]).all()  # not given: unknown
    ch = store.predictions("m", role="challenger")
    assert ch.record_id == ids[200:] and np.array_equal(ch.X, X[200:])
    v3 = store.predictions("m", version=3, role="champion")
    assert v3.record_id == ids[:200]
    assert store.predictions("m", version=3, role="challenger").record_id == []
    nofeat = store.predictions("m", features=False)
    assert nofeat.X.shape == (n, 0) and np.array_equal(nofeat.score, scores)
    empty = store.predictions("nothing")
    assert len(empty) == 0 and empty.X.shape[0] == 0
    # known_record: any captured role counts
    assert store.add_labels("m", [LabelRow(ids[0], "anomaly"), LabelRow(ids[250], "normal"), LabelRow("zz", "normal")]) == [True, True, False]


def test_predictions_shape_errors(store):
    with pytest.raises(ValueError, match="X must be"):
        store.add_predictions("m", 1, "champion", ["a", "b"], np.zeros((3, 2)), np.zeros(2), np.zeros(2, bool), np.zeros(2, bool), 0.0)
    with pytest.raises(ValueError, match="role must be one of champion, challenger"):
        store.add_predictions("m", 1, "boss", ["a"], np.zeros((1, 2)), np.zeros(1), np.zeros(1, bool), np.zeros(1, bool), 0.0)
    assert len(store.predictions("m")) == 0


def test_labelled_against_oracle(store, rng):
    n, d = 400, 5
    ids, X, scores, flagged, sampled = _random_predictions(rng, n, d)
    # some ids captured twice (re-sent records: the latest capture's features count), some by the challenger only
    again = rng.choice(n, 60, replace=False)
    X2 = rng.standard_normal((60, d)).astype(np.float32)
    store.add_predictions("m", 1, "champion", ids, X, scores, flagged, sampled, 1.0)
    store.add_predictions("m", 1, "champion", [ids[i] for i in again], X2, scores[again], flagged[again], sampled[again], 1.0)
    store.add_predictions("m", 2, "challenger", ["only-chal"], X[:1], scores[:1], flagged[:1], sampled[:1], 1.0)
    pool = ids + ["unknown-1", "unknown-2", "only-chal"]
    labels = [LabelRow(pool[int(rng.integers(len(pool)))], LABELS[int(rng.integers(2))], f"rev{int(rng.integers(3))}") for _ in range(700)]
    store.add_labels("m", labels[:350])
    store.add_labels("m", labels[350:])

    # oracle: plain dictionaries
    latest_x = {rid: X[i] for i, rid in enumerate(ids)}
    for j, i in enumerate(again):
        latest_x[ids[i]] = X2[j]
    latest_label, last_pos = {}, {}
    for pos, r in enumerate(labels):
        latest_label[r.record_id], last_pos[r.record_id] = r.label, pos
    expect = sorted((rid for rid in latest_label if rid in latest_x), key=last_pos.__getitem__)

    Xl, y, got_ids = store.labelled("m")
    assert got_ids == expect
    assert Xl.dtype == np.float64 and y.dtype == np.int8
    np.testing.assert_array_equal(Xl, np.array([latest_x[r] for r in expect], dtype=np.float64))
    np.testing.assert_array_equal(y, [1 if latest_label[r] == "anomaly" else 0 for r in expect])
    Xc, yc, idc = store.labelled("m", role="challenger")
    assert idc == (["only-chal"] if "only-chal" in latest_label else [])


def test_open_store_on_a_directory_names_the_path(tmp_path):
    with pytest.raises(OSError, match=f"cannot open the feedback store {tmp_path}"):
        open_store(tmp_path)


def _writer_process(path: str, tag: str, n_txn: int, barrier) -> None:
    s = open_store(path)
    rng = np.random.default_rng(abs(hash(tag)) % 2**32)
    barrier.wait()
    for k in range(n_txn):
        ids = [f"{tag}-{k}-{i}" for i in range(20)]
        X = np.full((20, 3), k, dtype=np.float32)
        s.add_predictions("m", 1, "champion", ids, X, rng.random(20), np.ones(20, bool), np.zeros(20, bool), 1.0)
        s.add_labels("m", [LabelRow(ids[0], "anomaly", tag), LabelRow(f"{tag}-free-{k}", "normal", tag)])
    s.close()


def test_two_processes_write_the_same_file(tmp_path):
    path = str(tmp_path / "fb.sqlite")
    open_store(path).close()
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    n_txn = 40
    procs = [ctx.Process(target=_writer_process, args=(path, tag, n_txn, barrier)) for tag in ("a", "b")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    s = open_store(path)
    try:
        pred = s.predictions("m")
        assert len(pred) == 2 * n_txn * 20
        assert set(pred.record_id) == {f"{t}-{k}-{i}" for t in "ab" for k in range(n_txn) for i in range(20)}
        labels = s.labels("m")
        assert len(labels) == 2 * n_txn * 2
        for tag in "ab":  # each process's labels in its own order, interleaved with the other's
            mine = [r.record_id for r in labels if r.reviewer == tag]
            assert mine == [x for k in range(n_txn) for x in (f"{tag}-{k}-0", f"{tag}-free-{k}")]
    finally:
        s.close()
