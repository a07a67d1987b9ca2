"""Prediction capture (monitoring/capture.py): what is captured, generated ids, and that capture never
blocks scoring: with a blocked, a failing or an unopenable store the server keeps answering with the
right scores while the dropped-capture counter rises."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from test_feedback import MODEL, LoopThread, cardio_X, make_registry, score_request, serving

from outlierd.core import load_model
from outlierd.core.registry import Registry
from outlierd.monitoring import capture as capture_mod
from outlierd.monitoring.capture import CaptureWriter, StoreOpener
from outlierd.monitoring.metrics import ServiceMetrics
from outlierd.monitoring.store import open_store
from outlierd.v1 import scoring_pb2 as pb


def _handle(d: int, name: str = "m", version: int = 2):
    return SimpleNamespace(name=name, version=version, model=SimpleNamespace(n_features=d))


def _metrics():
    reg = CollectorRegistry()
    return reg, ServiceMetrics(reg)


def _value(reg: CollectorRegistry, name: str, labels: dict[str, str]) -> float:
    v = reg.get_sample_value(name, labels)
    return 0.0 if v is None else v


@pytest.fixture
def store(tmp_path):
    s = open_store(tmp_path / "fb.sqlite")
    yield s
    s.close()


# ---------------------------------------------------------------------------------------------
# the writer on its own
# ---------------------------------------------------------------------------------------------


def test_every_flagged_record_and_a_random_sample_are_captured(store, rng):
    reg, metrics = _metrics()
    rate, d = 0.05, 6
    w = CaptureWriter(store, sample_rate=rate, metrics=metrics, seed=int(rng.integers(2**31))).start()
    h = _handle(d)
    sent: dict[str, tuple] = {}
    unflagged = 0
    for k in range(40):
        n = 500
        X = rng.standard_normal((n, d)).astype(np.float32)
        scores = rng.random(n)
        flagged = scores > 0.97
        ids = [f"m{k}-{i}" for i in range(n)]
        assert w.offer(h, "champion", ids, X, scores, flagged, 7.5, k)
        unflagged += int((~flagged).sum())
        sent.update({ids[i]: (X[i], scores[i], flagged[i]) for i in range(n)})
    assert w.flush(20)
    w.close()
    p = store.predictions("m")
    got_flagged = {rid for rid, f in zip(p.record_id, p.flagged) if f}
    assert got_flagged == {rid for rid, v in sent.items() if v[2]}  # every flagged record, nothing else flagged
    assert not (p.flagged & p.sampled).any() and (p.flagged | p.sampled).all()
    for i, rid in enumerate(p.record_id):  # each row is the record it names
        X, score, flag = sent[rid]
        np.testing.assert_array_equal(p.X[i], X)
        assert p.score[i] == score and p.flagged[i] == flag
    assert set(p.version) == {2} and set(p.role) == {"champion"}
    np.testing.assert_array_equal(p.latency_us, 7.5)
    np.testing.assert_array_equal(p.sample_rate, rate)
    # the sample: Binomial(unflagged, rate); 6 standard deviations either side
    k_sampled = int(p.sampled.sum())
    mean, sd = unflagged * rate, (unflagged * rate * (1 - rate)) ** 0.5
    assert abs(k_sampled - mean) < 6 * sd, (k_sampled, mean, sd)
    assert _value(reg, "outlierd_captured_total", {"model": "m", "role": "champion"}) == len(p) == w.captured
    assert w.dropped == 0


@pytest.mark.parametrize("raw", [True, False], ids=["raw_values", "values"])
def test_requests_without_ids_get_unique_generated_ids_and_their_features(store, rng, raw):
    d = 4
    w = CaptureWriter(store, sample_rate=1.0, token="tok").start()
    h = _handle(d)
    Xs = [rng.standard_normal((n, d)).astype(np.float32) for n in (3, 5, 2)]
    for X in Xs:  # the same request_id each time (clients often leave it 0): ids still differ
        req = score_request(X, request_id=7, raw=raw)
        w.offer_request(h, "challenger", req, rng.random(len(X)), np.zeros(len(X), bool))
    assert w.flush(10)
    w.close()
    p = store.predictions("m")
    expect_ids = [f"gen:tok:{seq}:7:{i}" for seq, X in enumerate(Xs, 1) for i in range(len(X))]
    assert p.record_id == expect_ids and len(set(p.record_id)) == len(expect_ids)
    np.testing.assert_array_equal(p.X, np.concatenate(Xs))
    assert set(p.role) == {"challenger"} and p.sampled.all()


def test_mixed_versions_roles_and_encodings_in_one_write(store, rng):
    d = 5
    w = CaptureWriter(store, sample_rate=0.3, seed=int(rng.integers(2**31)), interval_s=60).start()  # one write at flush
    handles = {1: _handle(d, version=1), 2: _handle(d, version=2)}
    sent = {}
    for k in range(60):
        n = int(rng.integers(1, 40))
        X = rng.standard_normal((n, d)).astype(np.float32)
        scores = rng.random(n)
        flagged = scores > 0.9
        ids = [f"x{k}-{i}" for i in range(n)]
        version, role = int(rng.integers(1, 3)), ("champion", "challenger")[int(rng.integers(2))]
        lat = float(rng.random() * 100)
        if k % 3 == 0:
            w.offer(handles[version], role, ids, X, scores, flagged, lat, k)
        else:
            req = score_request(X, ids, request_id=k, raw=k % 3 == 1)
            w.offer_request(handles[version], role, req, scores, flagged, lat)
        sent.update({ids[i]: (X[i], scores[i], flagged[i], version, role, lat) for i in range(n)})
    assert w.flush(20)
    w.close()
    p = store.predictions("m")
    assert len(p) == w.captured > 0
    assert {rid for rid, v in sent.items() if v[2]} <= set(p.record_id)
    for i, rid in enumerate(p.record_id):
        X, score, flag, version, role, lat = sent[rid]
        np.testing.assert_array_equal(p.X[i], X)
        assert (p.score[i], p.flagged[i], p.version[i], p.role[i], p.latency_us[i]) == (score, flag, version, role, lat)


def test_two_writers_never_generate_the_same_id(store):
    a, b = CaptureWriter(store, sample_rate=1.0), CaptureWriter(store, sample_rate=1.0)
    assert a.token != b.token  # one random token per worker start


class BlockingStore:
    """A store whose writes wait until released (a stuck disk)."""

    def __init__(self, inner):
        self.inner, self.release, self.calls = inner, threading.Event(), 0

    def add_predictions(self, *args, **kw):
        self.calls += 1
        self.release.wait()
        return self.inner.add_predictions(*args, **kw)

    def __getattr__(self, name):
        return getattr(self.inner, name)


class FailingStore:
    """A store whose writes raise until healed (a full or read-only disk)."""

    def __init__(self, inner):
        self.inner, self.failing = inner, True

    def add_predictions(self, *args, **kw):
        if self.failing:
            raise OSError("disk I/O error")
        return self.inner.add_predictions(*args, **kw)

    def add_labels(self, *args, **kw):
        if self.failing:
            raise OSError("disk I/O error")
        return self.inner.add_labels(*args, **kw)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_full_queue_drops_and_counts_never_blocks(store, rng):
    reg, metrics = _metrics()
    slow = BlockingStore(store)
    w = CaptureWriter(slow, sample_rate=0.0, max_queue=8, metrics=metrics).start()
    h = _handle(3)
    accepted_flags = dropped_flags = 0
    results = []
    total_flags = [0]

    def offers() -> None:
        nonlocal accepted_flags, dropped_flags
        for k in range(300):
            flagged = rng.random(50) < 0.2
            ok = w.offer(h, "champion", [f"{k}-{i}" for i in range(50)], np.zeros((50, 3), np.float32), np.ones(50), flagged)
            results.append(ok)
            total_flags[0] += int(flagged.sum())
            if ok:
                accepted_flags += int(flagged.sum())
            else:
                dropped_flags += int(flagged.sum())

    t = threading.Thread(target=offers)
    t.start()
    t.join(30)
    assert not t.is_alive(), "offer() blocked on a stuck store"
    # the writer holds what it took before the store stuck, the queue 8 more: the rest is dropped
    assert results.count(False) >= 250
    assert _value(reg, "outlierd_capture_dropped_total", {"model": "m", "reason": "queue_full"}) == dropped_flags == w.dropped
    slow.release.set()  # the disk comes back: what was queued gets written
    assert w.flush(20)
    w.close()
    assert len(store.predictions("m")) == accepted_flags == w.captured
    assert accepted_flags + dropped_flags == total_flags[0]  # every flagged record: written or counted as dropped


def test_failing_store_counts_write_errors_and_recovers(store, rng, monkeypatch):
    monkeypatch.setattr(capture_mod, "ERROR_BACKOFF_S", 0.01)
    reg, metrics = _metrics()
    bad = FailingStore(store)
    w = CaptureWriter(bad, sample_rate=0.0, metrics=metrics).start()
    h = _handle(2)
    flagged = np.array([True, False, True, True])
    for k in range(5):
        w.offer(h, "champion", [f"a{k}-{i}" for i in range(4)], np.zeros((4, 2), np.float32), np.ones(4), flagged)
    assert w.flush(10)
    assert _value(reg, "outlierd_capture_dropped_total", {"model": "m", "reason": "write_error"}) == 15
    bad.failing = False
    w.offer(h, "champion", ["b0", "b1", "b2", "b3"], np.zeros((4, 2), np.float32), np.ones(4), flagged)
    assert w.flush(10)
    w.close()
    assert store.predictions("m").record_id == ["b0", "b2", "b3"]


def test_store_opener_retries_after_a_failure(tmp_path):
    target = tmp_path / "later" / "fb.sqlite"
    opener = StoreOpener(target, retry_s=0.0)
    with pytest.raises(OSError, match="unavailable"):
        opener.get()
    target.parent.mkdir()
    s = opener.get()  # the directory exists now: opened
    assert s is opener.get()
    opener.close()


# ---------------------------------------------------------------------------------------------
# in the server
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def registry_dir(tmp_path_factory):
    return make_registry(tmp_path_factory.mktemp("capture"))


@pytest.fixture(scope="module")
def X():
    return cardio_X()


@pytest.fixture(scope="module")
def model(registry_dir):
    return load_model(Registry(registry_dir).path(MODEL, "champion"))


@pytest.fixture(scope="module")
def loop_thread():
    lt = LoopThread()
    yield lt
    lt.close()


def test_server_captures_flagged_records_with_scores_version_and_features(loop_thread, registry_dir, X, model, tmp_path):
    path = tmp_path / "fb.sqlite"
    with serving(loop_thread, registry_dir, feedback_store=path, capture_sample=0.0) as srv:
        ids = [f"p{i}" for i in range(len(X))]
        unary = srv.stub.Score(score_request(X[:600], ids[:600]))
        msgs = [score_request(X[k:k + 200], ids[k:k + 200], request_id=k, raw=bool(k % 400)) for k in range(600, len(X), 200)]
        stream = list(srv.stub.ScoreStream(iter(msgs)))
        assert srv.worker.flush_capture(10)
        captured = srv.sample("outlierd_captured_total", {"model": MODEL, "role": "champion"})
    scores = np.concatenate([unary.scores] + [r.scores for r in stream])
    flags = np.concatenate([unary.anomalous] + [r.anomalous for r in stream])
    np.testing.assert_allclose(scores, model.score(X), atol=1e-9)
    s = open_store(path)
    p = s.predictions(MODEL)
    s.close()
    want = [ids[i] for i in np.flatnonzero(flags)]
    assert flags.sum() > 10 and sorted(p.record_id) == sorted(want) and captured == len(want)
    pos = {rid: i for i, rid in enumerate(ids)}
    idx = np.array([pos[r] for r in p.record_id])
    np.testing.assert_array_equal(p.X, X[idx])
    np.testing.assert_array_equal(p.score, scores[idx])
    assert p.flagged.all() and not p.sampled.any() and set(p.version) == {1} and set(p.role) == {"champion"}


def test_micro_batched_requests_are_captured_each_record_with_its_own_id(loop_thread, registry_dir, X, model, tmp_path):
    # one scoring thread and four concurrent streams of small messages: requests queue up behind the
    # busy thread and are scored together, and the writer must still tell their records apart
    path = tmp_path / "fb.sqlite"
    ids = [f"mb{i}" for i in range(len(X))]
    starts = list(range(0, len(X) - 8, 8))
    with serving(loop_thread, registry_dir, feedback_store=path, capture_sample=0.0, threads=1) as srv:
        def stream(part: int) -> None:
            msgs = [score_request(X[k:k + 8], ids[k:k + 8], request_id=k) for k in starts[part::4]]
            got = list(srv.stub.ScoreStream(iter(msgs), timeout=30))
            assert [r.request_id for r in got] == [m.request_id for m in msgs] and not any(r.error for r in got)

        threads = [threading.Thread(target=stream, args=(p,)) for p in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert srv.worker.flush_capture(10)
        batches = srv.sample("outlierd_batch_size_records_count", {"model": MODEL})
        records = srv.sample("outlierd_batch_size_records_sum", {"model": MODEL})
    assert records == 8 * len(starts) and batches < len(starts)  # some kernel calls scored several requests
    scored = model.score(X[:8 * len(starts)])
    want = {ids[i] for i in np.flatnonzero(scored >= model.threshold)}
    s = open_store(path)
    p = s.predictions(MODEL)
    s.close()
    assert len(want) > 10 and sorted(p.record_id) == sorted(want)
    idx = np.array([int(r[2:]) for r in p.record_id])
    np.testing.assert_array_equal(p.X, X[idx])
    np.testing.assert_allclose(p.score, scored[idx], atol=1e-9)


def _stuck_store(tmp_path):
    return BlockingStore(open_store(tmp_path / "fb.sqlite"))


def _failing_store(tmp_path):
    return FailingStore(open_store(tmp_path / "fb.sqlite"))


@pytest.mark.parametrize("kind", ["stuck", "failing", "unopenable"])
def test_scoring_goes_on_when_the_store_cannot_keep_up(loop_thread, registry_dir, X, model, tmp_path, kind):
    store, overrides = None, {}
    if kind == "stuck":
        store = _stuck_store(tmp_path)
    elif kind == "failing":
        store = _failing_store(tmp_path)
    else:  # the store path is a directory: SQLite cannot open it
        (tmp_path / "dir.sqlite").mkdir()
        overrides["feedback_store"] = tmp_path / "dir.sqlite"
    try:
        with serving(loop_thread, registry_dir, store=store, capture_sample=1.0, **overrides) as srv:
            srv.worker.capture.max_queue = 4  # a small queue so a stuck store fills it within the test
            before = 0.0
            for round_ in range(3):
                msgs = [score_request(X[k:k + 64], [f"{round_}-{k}-{i}" for i in range(64)], request_id=k) for k in range(0, 1600, 64)]
                got = list(srv.stub.ScoreStream(iter(msgs), timeout=30))
                assert [r.request_id for r in got] == [m.request_id for m in msgs] and not any(r.error for r in got)
                np.testing.assert_allclose(np.concatenate([r.scores for r in got]), model.score(X[:1600]), atol=1e-9)
                one = srv.stub.Score(score_request(X[:3]), timeout=10)
                np.testing.assert_allclose(one.scores, model.score(X[:3]), atol=1e-9)
                dropped = sum(srv.sample("outlierd_capture_dropped_total", {"model": MODEL, "reason": r}) for r in ("queue_full", "write_error"))
                assert dropped > before  # every round: capture loses records, scoring does not wait
                before = dropped
                time.sleep(0.05 if kind != "stuck" else 0)
            assert srv.sample("outlierd_captured_total", {"model": MODEL, "role": "champion"}) == 0
            if kind == "stuck":
                store.release.set()  # let the stopped worker's writer finish
    finally:
        if isinstance(store, BlockingStore):
            store.release.set()
        if store is not None:
            store.inner.close()


# ---------------------------------------------------------------------------------------------
# settings: flags and OUTLIERD_* variables
# ---------------------------------------------------------------------------------------------


def test_capture_settings_from_flags_and_environment(monkeypatch, tmp_path):
    from outlierd.cli import build_parser
    from outlierd.server.settings import ServeSettings

    args = build_parser().parse_args(["serve", "--registry", str(tmp_path), "--model", "m", "--no-capture", "--capture-sample", "0.2",
                                      "--feedback-store", str(tmp_path / "x.sqlite")])
    assert (args.capture, args.capture_sample, args.feedback_store) == (0, 0.2, str(tmp_path / "x.sqlite"))
    defaults = ServeSettings(registry=tmp_path, model="m")
    assert (defaults.capture, defaults.capture_sample, defaults.feedback_store) == (1, 0.01, None)
    monkeypatch.setenv("OUTLIERD_CAPTURE_SAMPLE", "0.3")
    monkeypatch.setenv("OUTLIERD_CAPTURE", "0")
    monkeypatch.setenv("OUTLIERD_FEEDBACK_STORE", str(tmp_path / "env.sqlite"))
    s = ServeSettings.from_env(registry=tmp_path, model="m")
    assert (s.capture, s.capture_sample, s.feedback_store) == (0, 0.3, tmp_path / "env.sqlite")
    assert ServeSettings.from_env(registry=tmp_path, model="m", capture_sample=0.05).capture_sample == 0.05  # flags win
    monkeypatch.setenv("OUTLIERD_CAPTURE_SAMPLE", "1.5")
    with pytest.raises(ValueError, match=r"--capture-sample must be in \[0, 1\]; got 1.5"):
        ServeSettings.from_env(registry=tmp_path, model="m")


def test_no_capture_server_writes_no_predictions(loop_thread, registry_dir, X, tmp_path):
    path = tmp_path / "fb.sqlite"
    with serving(loop_thread, registry_dir, feedback_store=path, capture=0) as srv:
        assert srv.worker.capture is None
        srv.stub.Score(score_request(X[:500], [f"n{i}" for i in range(500)]))
        ack = srv.stub.SubmitFeedback(pb.FeedbackRequest(record_id="n1", label=pb.NORMAL))
        assert ack.stored and not ack.known_record  # labels are still taken
    s = open_store(path)
    assert len(s.predictions(MODEL)) == 0 and len(s.labels(MODEL)) == 1
    s.close()


# ---------------------------------------------------------------------------------------------
# capture of a scored micro-batch on the scoring thread (capture_batch), as the server uses the writer
# ---------------------------------------------------------------------------------------------


def test_a_micro_batch_is_captured_per_request_each_record_with_its_own_id(store, rng):
    d = 4
    w = CaptureWriter(store, sample_rate=0.2, seed=int(rng.integers(2**31)), interval_s=60).start()
    h = _handle(d)
    sizes = [5, 40, 1, 23, 7]
    Xs = [rng.standard_normal((n, d)).astype(np.float32) for n in sizes]
    scores = rng.random(sum(sizes))
    flagged = scores >= 0.8
    msgs = [([f"b{k}-{i}" for i in range(n)], k) for k, n in enumerate(sizes)]
    msgs[3] = ((), 3)  # a message without ids: generated ones
    sel = w.capture_batch(h, "champion", np.concatenate(Xs), scores, 0.8, msgs, sizes, latency_us=2.0)  # one call over the micro-batch
    assert sel is not None and sel.k >= int(flagged.sum())
    start, sent = 0, {}
    for k, n in enumerate(sizes):
        ids = msgs[k][0] or [f"gen:{w.token}:{i}" for i in range(n)]  # the generated ones, less their sequence and request id
        sent.update({ids[i]: (Xs[k][i], scores[start + i], flagged[start + i]) for i in range(n)})
        start += n
    assert w.flush(20)
    w.close()
    p = store.predictions("m")
    assert len(p) == sel.k == w.captured
    got = []
    for rid in p.record_id:
        if rid.startswith("gen:"):
            _gen, token, _seq, request_id, i = rid.split(":")
            assert request_id == "3"
            rid = f"gen:{token}:{i}"
        got.append(rid)
    assert {r for r, f in zip(got, p.flagged) if f} == {r for r, v in sent.items() if v[2]}
    for i, rid in enumerate(got):
        X, score, flag = sent[rid]
        np.testing.assert_array_equal(p.X[i], X)
        assert p.score[i] == score and p.flagged[i] == flag and p.sampled[i] == (not flag)
    assert np.all(p.latency_us == 2.0)


def test_a_writer_a_whole_ring_behind_counts_the_overwritten_records(store, rng):
    reg, metrics = _metrics()
    d = 3
    w = CaptureWriter(store, sample_rate=1.0, metrics=metrics, interval_s=60, ring_bytes=1).start()  # the smallest ring: 1,024 records
    h = _handle(d)
    for k in range(6):  # 6 x 400 records, nothing taken in between: the first ones are overwritten
        X = np.full((400, d), k, dtype=np.float32)
        assert w.offer(h, "champion", [f"o{k}-{i}" for i in range(400)], X, rng.random(400), np.zeros(400, bool))
    assert w.flush(20)
    w.close()
    p = store.predictions("m")
    assert w.captured == len(p) and w.captured + w.dropped == 2400
    assert w.dropped == _value(reg, "outlierd_capture_dropped_total", {"model": "m", "reason": "queue_full"}) >= 2400 - 1024
    assert set(np.unique(p.X[:, 0]).tolist()) <= {3.0, 4.0, 5.0}  # only the newest messages survived, intact
    for i, rid in enumerate(p.record_id):
        assert p.X[i, 0] == float(rid[1])
