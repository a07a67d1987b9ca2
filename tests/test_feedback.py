"""Feedback: the SubmitFeedback / SubmitFeedbackStream RPCs on a real server, live quality (against a
slow oracle and a hand-computed example), the ``outlierd feedback`` CLI, and no acknowledged label
lost while the server is killed with SIGKILL and restarted."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import ROOT, dataset_path, LoopThread
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry

from outlierd.monitoring import quality
from outlierd.monitoring.metrics import ServiceMetrics
from outlierd.monitoring.store import LABELS, LabelRow, Predictions, open_store
from outlierd.cli import main as cli_main
from outlierd.v1 import scoring_pb2 as pb
from outlierd.v1 import scoring_pb2_grpc as pb_grpc
from outlierd.server.app import start_worker
from outlierd.server.settings import ServeSettings

MODEL = "cardio"
D = 21

# ---------------------------------------------------------------------------------------------
# helpers shared with test_capture.py: a registry, an event loop in a thread, in-process workers
# ---------------------------------------------------------------------------------------------


def make_registry(root: Path) -> Path:
    from outlierd.training.train import train

    reg = root / "reg"
    train(dataset_path("cardio"), reg, MODEL, alias="champion", label_column="label", alert_rate=0.05, quiet=True)
    return reg


def cardio_X() -> np.ndarray:
    return np.loadtxt(dataset_path("cardio"), delimiter=",", skiprows=1)[:, :-1].astype(np.float32)


class Running:
    def __init__(self, worker, metrics_registry: CollectorRegistry):
        self.worker, self.metrics = worker, metrics_registry
        self.target = f"127.0.0.1:{worker.port}"
        self.channel = grpc.insecure_channel(self.target)
        self.stub = pb_grpc.ScorerStub(self.channel)

    def sample(self, name: str, labels: dict[str, str]) -> float:
        v = self.metrics.get_sample_value(name, labels)
        return 0.0 if v is None else v


@contextlib.contextmanager
def serving(loop_thread: LoopThread, registry_dir: Path, store=None, **overrides):
    """A worker on 127.0.0.1, port 0, drift off, with a fresh Prometheus registry."""
    kw = {"registry": registry_dir, "model": MODEL, "host": "127.0.0.1", "port": 0, "drift": 0}
    kw.update(overrides)
    settings = ServeSettings(**kw)
    settings.validate()
    reg = CollectorRegistry()
    worker = loop_thread.call(start_worker(settings, ServiceMetrics(reg), store=store))
    running = Running(worker, reg)
    try:
        yield running
    finally:
        running.channel.close()
        loop_thread.call(worker.stop(1.0))


def rpc_error(fn, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        fn(*args, **kwargs)
    return info.value


def score_request(X: np.ndarray, ids=(), request_id: int = 0, raw: bool = True) -> pb.ScoreRequest:
    req = pb.ScoreRequest(n_features=X.shape[1], ids=list(ids), request_id=request_id)
    if raw:
        req.raw_values = np.ascontiguousarray(X, dtype="<f4").tobytes()
    else:
        req.values.extend(X.ravel().tolist())
    return req


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def registry_dir(tmp_path_factory) -> Path:
    return make_registry(tmp_path_factory.mktemp("feedback"))


@pytest.fixture(scope="module")
def X() -> np.ndarray:
    return cardio_X()


@pytest.fixture(scope="module")
def loop_thread():
    lt = LoopThread()
    yield lt
    lt.close()


# ---------------------------------------------------------------------------------------------
# the RPCs
# ---------------------------------------------------------------------------------------------


def test_unary_feedback_is_stored_with_known_flag(loop_thread, registry_dir, X, tmp_path):
    path = tmp_path / "fb.sqlite"
    with serving(loop_thread, registry_dir, feedback_store=path, capture_sample=1.0) as srv:
        ids = [f"tx-{i}" for i in range(20)]
        srv.stub.Score(score_request(X[:20], ids))
        assert srv.worker.flush_capture(10)
        a = srv.stub.SubmitFeedback(pb.FeedbackRequest(record_id="tx-3", label=pb.ANOMALY, reviewer="ann", note="card, stolen"))
        b = srv.stub.SubmitFeedback(pb.FeedbackRequest(model=MODEL, record_id="never-scored", label=pb.NORMAL))
        assert (a.record_id, a.stored, a.known_record, a.error) == ("tx-3", True, True, "")
        assert (b.record_id, b.stored, b.known_record, b.error) == ("never-scored", True, False, "")
        # acknowledged means committed: a separate connection sees both while the server still runs
        s = open_store(path)
        try:
            got = [(r.record_id, r.label, r.reviewer, r.note) for r in s.labels(MODEL)]
        finally:
            s.close()
    assert got == [("tx-3", "anomaly", "ann", "card, stolen"), ("never-scored", "normal", "", "")]


@pytest.mark.parametrize("req, code, details", [
    (pb.FeedbackRequest(record_id="", label=pb.ANOMALY), grpc.StatusCode.INVALID_ARGUMENT,
     "record_id is empty: send the id the record was scored with"),
    (pb.FeedbackRequest(record_id="a", label=pb.LABEL_UNSPECIFIED), grpc.StatusCode.INVALID_ARGUMENT,
     "label is LABEL_UNSPECIFIED: set ANOMALY or NORMAL"),
    (pb.FeedbackRequest(model="other", record_id="a", label=pb.NORMAL), grpc.StatusCode.NOT_FOUND,
     "unknown model 'other'; this server serves 'cardio'"),
], ids=["empty-id", "unspecified-label", "unknown-model"])
def test_unary_invalid_feedback(loop_thread, registry_dir, tmp_path, req, code, details):
    path = tmp_path / "fb.sqlite"
    with serving(loop_thread, registry_dir, feedback_store=path) as srv:
        err = rpc_error(srv.stub.SubmitFeedback, req)
        assert err.code() == code and err.details() == details
    s = open_store(path)
    assert s.labels(MODEL) == [] and s.labels("other") == []
    s.close()


def test_stream_acks_in_order_and_goes_on_after_invalid_messages(loop_thread, registry_dir, tmp_path, rng):
    path = tmp_path / "fb.sqlite"
    n = 700  # more than one group commit
    reqs, expect_stored = [], []
    bad_at = set(rng.choice(n, 25, replace=False).tolist())
    for i in range(n):
        if i in bad_at:
            kind = i % 3
            req = (pb.FeedbackRequest(record_id="", label=pb.ANOMALY) if kind == 0 else
                   pb.FeedbackRequest(record_id=f"b{i}") if kind == 1 else
                   pb.FeedbackRequest(model="nope", record_id=f"b{i}", label=pb.NORMAL))
        else:
            req = pb.FeedbackRequest(record_id=f"s{i}", label=pb.ANOMALY if rng.random() < 0.3 else pb.NORMAL, reviewer=f"r{i % 4}")
            expect_stored.append((req.record_id, "anomaly" if req.label == pb.ANOMALY else "normal", req.reviewer))
        reqs.append(req)
    with serving(loop_thread, registry_dir, feedback_store=path) as srv:
        acks = list(srv.stub.SubmitFeedbackStream(iter(reqs), timeout=60))
    assert len(acks) == n
    for i, (req, ack) in enumerate(zip(reqs, acks)):
        assert ack.record_id == req.record_id
        if i in bad_at:
            assert not ack.stored and ack.error.split(":")[0] in ("INVALID_ARGUMENT", "NOT_FOUND"), ack
        else:
            assert ack.stored and not ack.error and not ack.known_record
    s = open_store(path)
    assert [(r.record_id, r.label, r.reviewer) for r in s.labels(MODEL)] == expect_stored
    s.close()


class _CountingStore:
    def __init__(self, inner):
        self.inner, self.label_calls = inner, 0

    def add_labels(self, model, rows):
        self.label_calls += 1
        return self.inner.add_labels(model, rows)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_concurrent_unary_calls_share_commits(loop_thread, registry_dir, tmp_path, rng):
    store = _CountingStore(open_store(tmp_path / "fb.sqlite"))
    n = 300
    labels = [pb.FeedbackRequest(record_id=f"c{i}", label=pb.ANOMALY if rng.random() < 0.5 else pb.NORMAL, reviewer="r") for i in range(n)]
    try:
        with serving(loop_thread, registry_dir, store=store) as srv:
            futures = [srv.stub.SubmitFeedback.future(req, timeout=30) for req in labels]
            acks = [f.result() for f in futures]
        assert [(a.record_id, a.stored, a.known_record) for a in acks] == [(r.record_id, True, False) for r in labels]
        got = {(r.record_id, r.label) for r in store.labels(MODEL)}
        assert got == {(r.record_id, "anomaly" if r.label == pb.ANOMALY else "normal") for r in labels}
        assert store.label_calls < n  # calls that waited for a commit went into the next one together
    finally:
        store.inner.close()


def test_unwritable_store_refuses_feedback_and_scoring_goes_on(loop_thread, registry_dir, tmp_path, X):
    not_a_file = tmp_path / "a-directory"
    not_a_file.mkdir()
    with serving(loop_thread, registry_dir, feedback_store=not_a_file) as srv:
        err = rpc_error(srv.stub.SubmitFeedback, pb.FeedbackRequest(record_id="a", label=pb.ANOMALY))
        assert err.code() == grpc.StatusCode.UNAVAILABLE
        assert err.details().startswith(f"feedback store unavailable, labels not stored: feedback store {not_a_file} unavailable")
        acks = list(srv.stub.SubmitFeedbackStream(iter([pb.FeedbackRequest(record_id="a", label=pb.NORMAL),
                                                        pb.FeedbackRequest(record_id="", label=pb.NORMAL)])))
        assert [a.stored for a in acks] == [False, False]
        assert acks[0].error.startswith("UNAVAILABLE: feedback store unavailable") and acks[1].error.startswith("INVALID_ARGUMENT")
        assert len(srv.stub.Score(score_request(X[:5])).scores) == 5


def test_quality_gauges_follow_the_labels(loop_thread, registry_dir, X, tmp_path):
    path = tmp_path / "fb.sqlite"
    with serving(loop_thread, registry_dir, feedback_store=path, capture_sample=0.5) as srv:
        srv.worker.feedback.quality_interval_s = 0.05
        ids = [f"q{i}" for i in range(len(X))]
        resp = srv.stub.Score(score_request(X, ids))
        assert srv.worker.flush_capture(10)
        flagged = [ids[i] for i in np.flatnonzero(resp.anomalous)]
        labels = [pb.FeedbackRequest(record_id=r, label=pb.ANOMALY if k % 3 else pb.NORMAL, reviewer="a") for k, r in enumerate(flagged)]
        labels += [pb.FeedbackRequest(record_id=ids[i], label=pb.NORMAL, reviewer="b") for i in range(0, 400, 4)]
        labels += [pb.FeedbackRequest(record_id=flagged[0], label=pb.NORMAL, reviewer="b"),
                   pb.FeedbackRequest(record_id="ghost", label=pb.ANOMALY, reviewer="c")]
        assert all(a.stored for a in srv.stub.SubmitFeedbackStream(iter(labels)))
        s = open_store(path)
        expect = quality.from_store(s, MODEL)
        s.close()
        assert expect.precision is not None and expect.disagreement is not None and expect.unknown_records >= 1
        deadline = time.monotonic() + 20
        while True:
            got = srv.sample("outlierd_feedback_precision", {"model": MODEL})
            if got == pytest.approx(expect.precision) or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert got == pytest.approx(expect.precision)
        recall = srv.sample("outlierd_feedback_recall_estimate", {"model": MODEL})
        assert (np.isnan(recall) and expect.recall_estimate is None) or recall == pytest.approx(expect.recall_estimate)
        assert srv.sample("outlierd_feedback_disagreement", {"model": MODEL}) == pytest.approx(expect.disagreement)
        assert srv.sample("outlierd_feedback_labels_total", {"model": MODEL, "label": "anomaly"}) == expect.by_label["anomaly"]
        assert srv.sample("outlierd_feedback_labels_total", {"model": MODEL, "label": "normal"}) == expect.by_label["normal"]
        assert srv.sample("outlierd_feedback_unknown_records", {"model": MODEL}) == expect.unknown_records


# ---------------------------------------------------------------------------------------------
# live quality: a hand-computed example and a slow oracle on random data
# ---------------------------------------------------------------------------------------------


def _preds(ids, flagged, sampled, rates) -> Predictions:
    n = len(ids)
    return Predictions(record_id=list(ids), version=np.ones(n, np.int64), role=["champion"] * n, score=np.zeros(n),
                       flagged=np.array(flagged, bool), sampled=np.array(sampled, bool), ts=np.zeros(n), latency_us=np.zeros(n),
                       X=np.zeros((n, 0), np.float32), sample_rate=np.array(rates, float))


def test_quality_hand_computed_example():
    # 4 flagged captures f1..f4; 3 sampled unflagged captures at rate 0.1 (s1..s3): they stand for 30 unflagged records
    ids = ["f1", "f2", "f3", "f4", "s1", "s2", "s3"]
    p = _preds(ids, [1, 1, 1, 1, 0, 0, 0], [0, 0, 0, 0, 1, 1, 1], [0.1] * 7)
    labels = [LabelRow("f1", "anomaly", "ann"), LabelRow("f2", "normal", "ann"), LabelRow("f3", "anomaly", "ann"),
              LabelRow("f3", "normal", "bob"),                # f3: ann and bob disagree; latest label normal
              LabelRow("f1", "anomaly", "bob"),               # f1: they agree
              LabelRow("s1", "anomaly", "ann"), LabelRow("s2", "normal", "ann"),
              LabelRow("zz", "anomaly", "ann")]               # no capture: unknown
    q = quality.compute(p, labels)
    # reviewed flagged: f1 (anomaly), f2 (normal), f3 (normal, latest) -> precision 1/3
    assert (q.reviewed_flagged, q.reviewed_flagged_anomalies, q.precision) == (3, 1, pytest.approx(1 / 3))
    # TP = 1/3 * 4 flagged = 4/3; unflagged population = 3 / 0.1 = 30; reviewed sampled: s1 anomaly, s2 normal -> 1/2
    # FN = 1/2 * 30 = 15; recall = (4/3) / (4/3 + 15) = 4 / 49
    assert q.est_unflagged_records == pytest.approx(30.0)
    assert q.est_true_positives == pytest.approx(4 / 3) and q.est_false_negatives == pytest.approx(15.0)
    assert q.recall_estimate == pytest.approx(4 / 49)
    # disagreement: f1 (ann, bob agree), f3 (disagree) -> 1 of 2
    assert (q.multi_reviewer_records, q.disagreeing_records, q.disagreement) == (2, 1, 0.5)
    assert q.labels == 8 and q.by_label == {"anomaly": 5, "normal": 3}
    assert (q.labelled_records, q.unknown_records, q.unknown_labels) == (6, 1, 1)


def _oracle(ids, flagged, sampled, rates, labels):
    """The documented estimators, written out with plain loops over records."""
    latest, per_reviewer = {}, {}
    for r in labels:
        latest[r.record_id] = r.label
        per_reviewer.setdefault(r.record_id, {})[r.reviewer] = r.label
    last_capture = {}
    for i, rid in enumerate(ids):
        last_capture[rid] = i
    rf = rfa = rs = rsa = 0
    for rid, lab in latest.items():
        if rid not in last_capture:
            continue
        i = last_capture[rid]
        if flagged[i]:
            rf += 1
            rfa += lab == "anomaly"
        elif sampled[i]:
            rs += 1
            rsa += lab == "anomaly"
    precision = rfa / rf if rf else None
    n_flagged = sum(1 for f in flagged if f)
    population = 0.0
    for f, s, r in zip(flagged, sampled, rates):
        if s and not f:
            population += 1.0 / r
    recall = None
    if precision is not None and rs:
        tp, fn = precision * n_flagged, rsa / rs * population
        recall = tp / (tp + fn) if tp + fn > 0 else None
    multi = [v for v in per_reviewer.values() if len(v) >= 2]
    dis = sum(1 for v in multi if len(set(v.values())) > 1)
    return precision, recall, (dis / len(multi) if multi else None), len([r for r in latest if r not in last_capture])


def test_quality_against_oracle_on_random_data(rng):
    for _ in range(5):
        n = int(rng.integers(200, 2000))
        ids = [f"r{int(i)}" for i in rng.integers(0, int(n * 0.9), n)]  # some ids captured twice
        flagged = rng.random(n) < 0.05
        rate = float(rng.choice([0.01, 0.05, 0.2]))
        rates = np.where(rng.random(n) < 0.5, rate, rate * 2)  # the sample rate changed mid-way
        sampled = ~flagged & (rng.random(n) < 0.3)
        pool = sorted(set(ids)) + [f"u{i}" for i in range(20)]
        labels = [LabelRow(pool[int(rng.integers(len(pool)))], LABELS[int(rng.random() < 0.6)], f"rev{int(rng.integers(3))}")
                  for _ in range(int(rng.integers(50, 800)))]
        q = quality.compute(_preds(ids, flagged, sampled, rates), labels)
        precision, recall, dis, unknown = _oracle(ids, flagged, sampled, rates, labels)
        assert q.precision == pytest.approx(precision) if precision is not None else q.precision is None
        assert q.recall_estimate == pytest.approx(recall) if recall is not None else q.recall_estimate is None
        assert q.disagreement == pytest.approx(dis) if dis is not None else q.disagreement is None
        assert q.unknown_records == unknown


def test_recall_estimate_recovers_the_true_recall_on_simulated_traffic(rng):
    # 200,000 records, 2% anomalies, a detector with 70% recall; capture: every flag + 2% of the rest;
    # reviewers label every flagged capture and every sampled one. The estimate lands near 0.7.
    n = 200_000
    truth = rng.random(n) < 0.02
    flagged = np.where(truth, rng.random(n) < 0.7, rng.random(n) < 0.005)
    sampled = ~flagged & (rng.random(n) < 0.02)
    keep = flagged | sampled
    ids = [f"r{i}" for i in np.flatnonzero(keep)]
    labels = [LabelRow(f"r{i}", "anomaly" if truth[i] else "normal") for i in np.flatnonzero(keep)]
    q = quality.compute(_preds(ids, flagged[keep], sampled[keep], np.full(keep.sum(), 0.02)), labels)
    true_recall = (truth & flagged).sum() / truth.sum()
    assert abs(q.recall_estimate - true_recall) < 0.1, (q.recall_estimate, true_recall)
    assert q.precision == pytest.approx((truth & flagged).sum() / flagged.sum())


class _PlainStore:
    """The store seen through the Store protocol only (no SQL shortcuts)."""

    def __init__(self, inner):
        self.inner = inner

    def labels(self, model):
        return self.inner.labels(model)

    def predictions(self, model, **kw):
        return self.inner.predictions(model, **kw)


def test_quality_from_sqlite_totals_equals_the_full_read(tmp_path, rng):
    s = open_store(tmp_path / "fb.sqlite")
    try:
        for k in range(6):  # several batches: the running totals add up; ids re-captured; both roles
            n = int(rng.integers(50, 300))
            ids = [f"r{int(i)}" for i in rng.integers(0, 400, n)]
            flagged = rng.random(n) < 0.1
            sampled = ~flagged & (rng.random(n) < 0.5)
            rate = [0.01, 0.05, float("nan")][k % 3]  # a rate change, and captures from a writer without one
            s.add_predictions(MODEL, 1 + k // 3, ["champion", "challenger"][k % 2], ids, rng.standard_normal((n, 3)), rng.random(n),
                              flagged, sampled, 1.0, sample_rate=rate)
        pool = [f"r{i}" for i in range(420)]
        s.add_labels(MODEL, [LabelRow(pool[int(rng.integers(420))], LABELS[int(rng.integers(2))], f"v{int(rng.integers(3))}")
                             for _ in range(600)])
        for role in ("champion", "challenger"):
            fast, slow = quality.from_store(s, MODEL, role=role), quality.from_store(_PlainStore(s), MODEL, role=role)
            a, b = fast.as_dict(), slow.as_dict()
            for key in a:
                if isinstance(a[key], float):
                    assert a[key] == pytest.approx(b[key]), key
                else:
                    assert a[key] == b[key], key
            assert fast.reviewed_flagged > 0 and fast.reviewed_sampled > 0
    finally:
        s.close()


# ---------------------------------------------------------------------------------------------
# the CLI
# ---------------------------------------------------------------------------------------------


def _write_csv(path: Path, header, rows) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def test_cli_import_export_round_trip(registry_dir, tmp_path, rng, capsys):
    store = tmp_path / "fb.sqlite"
    words = ["anomaly", "normal", "1", "0", "TRUE", "False", " Anomaly "]
    rows = [(f"id,{i}", words[int(rng.integers(len(words)))], f"rev{int(rng.integers(3))}", f'said "x", then\nmore {i}' if i % 5 == 0 else "")
            for i in range(120)]
    src = tmp_path / "in.csv"
    _write_csv(src, ["record_id", "label", "reviewer", "note"], rows)
    common = ["--registry", str(registry_dir), "--model", MODEL, "--feedback-store", str(store)]
    assert cli_main(["feedback", "import", *common, str(src)]) == 0
    assert "imported 120 labels" in capsys.readouterr().out
    out = tmp_path / "out.csv"
    assert cli_main(["feedback", "export", *common, "--out", str(out)]) == 0
    norm = {"anomaly": "anomaly", "1": "anomaly", "true": "anomaly", "normal": "normal", "0": "normal", "false": "normal"}
    expect = [[r[0], norm[r[1].strip().lower()], r[2], r[3]] for r in rows]
    with open(out, newline="", encoding="utf-8") as f:
        got = list(csv.reader(f))
    assert got[0] == ["record_id", "label", "reviewer", "note"] and got[1:] == expect
    # the export imports again, unchanged: the store then holds every label twice, in order
    assert cli_main(["feedback", "import", *common, str(out)]) == 0
    s = open_store(store)
    assert [[r.record_id, r.label, r.reviewer, r.note] for r in s.labels(MODEL)] == expect + expect
    s.close()
    # a two-column file (record_id,label) works too
    _write_csv(src, ["label", "record_id"], [["normal", "z1"]])
    assert cli_main(["feedback", "import", *common, str(src)]) == 0


@pytest.mark.parametrize("header, rows, message", [
    (["record_id", "label"], [["a", "anomaly"], ["b", "maybe"]],
     "line 3: label 'maybe' is not one of anomaly, normal, 1, 0, true, false"),
    (["record_id", "label"], [["a", "anomaly"], ["", "normal"]], "line 3: record_id is empty"),
    (["record_id", "verdict"], [["a", "anomaly"]], "line 1: header is 'record_id,verdict'; expected the columns record_id,label[,reviewer,note]"),
    (["record_id", "label"], [["a", "anomaly", "extra"]], "line 2: 3 fields, the header has 2"),
], ids=["bad-label", "empty-id", "bad-header", "extra-field"])
def test_cli_import_errors_import_nothing(registry_dir, tmp_path, capsys, header, rows, message):
    store = tmp_path / "fb.sqlite"
    src = tmp_path / "in.csv"
    _write_csv(src, header, rows)
    rc = cli_main(["feedback", "import", "--registry", str(registry_dir), "--model", MODEL, "--feedback-store", str(store), str(src)])
    err = capsys.readouterr().err
    assert rc == 2 and err == f"outlierd: error: {src} {message}\n"
    assert not store.exists() or open_store(store).labels(MODEL) == []


def test_cli_unknown_model_and_missing_store(registry_dir, tmp_path, capsys):
    src = tmp_path / "in.csv"
    _write_csv(src, ["record_id", "label"], [["a", "1"]])
    assert cli_main(["feedback", "import", "--registry", str(registry_dir), "--model", "nope", str(src)]) == 2
    assert capsys.readouterr().err.startswith("outlierd: error: no model 'nope' in registry")
    missing = tmp_path / "none.sqlite"
    assert cli_main(["feedback", "stats", "--registry", str(registry_dir), "--model", MODEL, "--feedback-store", str(missing)]) == 2
    assert capsys.readouterr().err == f"outlierd: error: no feedback store at {missing} (nothing captured or imported yet; or pass --feedback-store)\n"


def test_cli_stats_json_matches_quality(registry_dir, tmp_path, rng, capsys):
    path = tmp_path / "fb.sqlite"
    s = open_store(path)
    n = 500
    ids = [f"r{i}" for i in range(n)]
    flagged = rng.random(n) < 0.1
    s.add_predictions(MODEL, 1, "champion", ids, rng.standard_normal((n, D)), rng.random(n), flagged, ~flagged, 1.0, sample_rate=0.05)
    s.add_labels(MODEL, [LabelRow(ids[int(i)], LABELS[int(rng.integers(2))], f"r{int(rng.integers(2))}") for i in rng.integers(0, n, 150)])
    expect = quality.from_store(s, MODEL)
    s.close()
    common = ["--registry", str(registry_dir), "--model", MODEL, "--feedback-store", str(path)]
    assert cli_main(["feedback", "stats", *common, "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["precision"] == pytest.approx(expect.precision) and got["recall_estimate"] == pytest.approx(expect.recall_estimate)
    assert got["disagreement"] == pytest.approx(expect.disagreement) and got["labels"] == 150
    assert cli_main(["feedback", "stats", *common]) == 0
    text = capsys.readouterr().out
    assert f"precision       {expect.precision:.4f}" in text and "recall (est.)" in text


# ---------------------------------------------------------------------------------------------
# no acknowledged label is lost when the server is killed
# ---------------------------------------------------------------------------------------------


def _env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTLIERD_") and k != "PROMETHEUS_MULTIPROC_DIR"}
    env["OUTLIERD_LOG_LEVEL"] = "WARNING"
    return env


class Server:
    def __init__(self, tmp: Path, registry_dir: Path, store: Path, port: int):
        self.cmd = [sys.executable, "-m", "outlierd", "serve", "--registry", str(registry_dir), "--model", MODEL, "--host", "127.0.0.1",
                    "--port", str(port), "--metrics-port", "0", "--no-drift", "--feedback-store", str(store)]
        self.tmp, self.target, self.proc = tmp, f"127.0.0.1:{port}", None
        self.log = tmp / "server.log"

    def start(self, timeout: float = 60.0) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.cmd, cwd=ROOT, env=_env(self.tmp), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.target) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            while True:
                assert self.proc.poll() is None, f"server exited {self.proc.returncode}:\n{self.log.read_text()[-3000:]}"
                try:
                    if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                assert time.monotonic() < deadline, f"not serving after {timeout}s:\n{self.log.read_text()[-3000:]}"
                time.sleep(0.05)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


def test_no_acknowledged_label_is_lost_across_sigkill(registry_dir, tmp_path):
    n_labels, kills = 10_000, 4
    store = tmp_path / "fb.sqlite"
    server = Server(tmp_path, registry_dir, store, free_port())
    rnd = random.Random(os.urandom(8))
    labels = [pb.FeedbackRequest(record_id=f"k{i}", label=pb.ANOMALY if rnd.random() < 0.5 else pb.NORMAL, reviewer=f"rev{i % 5}")
              for i in range(n_labels)]
    acked: dict[str, pb.FeedbackRequest] = {}
    todo = list(range(n_labels))
    stop = threading.Event()
    errors: list[str] = []
    broken = [0]  # calls cut by a kill

    def client() -> None:
        # streams of a few hundred labels (every 7th chunk as unary calls); on a broken call, the
        # labels not acknowledged go back to the front of the queue and are sent again
        chunk_no = 0
        while todo and not stop.is_set():
            chunk, rest = todo[:300], todo[300:]
            try:
                with grpc.insecure_channel(server.target) as ch:
                    stub = pb_grpc.ScorerStub(ch)
                    if chunk_no % 7 == 6:
                        for i in chunk:
                            ack = stub.SubmitFeedback(labels[i], timeout=10)
                            assert ack.stored and ack.record_id == labels[i].record_id
                            acked[ack.record_id] = labels[i]
                    else:
                        for ack in stub.SubmitFeedbackStream(iter([labels[i] for i in chunk]), timeout=30):
                            if ack.stored:
                                acked[ack.record_id] = labels[int(ack.record_id[1:])]
                            else:
                                errors.append(ack.error)
                todo[:] = rest
            except grpc.RpcError:
                broken[0] += 1
                todo[:] = [i for i in chunk if labels[i].record_id not in acked] + rest
                time.sleep(0.05)
            chunk_no += 1

    server.start()
    t = threading.Thread(target=client, daemon=True)
    t.start()
    try:
        # kill at random points of the run (by labels acknowledged so far), so every kill lands mid-stream
        for threshold in sorted(rnd.sample(range(500, n_labels - 500), kills)):
            while len(acked) < threshold and t.is_alive():
                time.sleep(0.005)
            time.sleep(rnd.uniform(0, 0.02))
            server.kill()
            server.start()
        t.join(120)
        assert not t.is_alive(), f"client still sending; {len(todo)} labels left"
    finally:
        stop.set()
        server.kill()
    assert not errors, errors[:5]
    assert broken[0] >= 1, "no call was cut by a kill: the test did not test anything"
    assert len(acked) == n_labels  # every label was acknowledged in the end (resent after kills)
    s = open_store(store)
    try:
        stored = {(r.record_id, r.label, r.reviewer) for r in s.labels(MODEL)}
    finally:
        s.close()
    names = {pb.ANOMALY: "anomaly", pb.NORMAL: "normal"}
    missing = [rid for rid, req in acked.items() if (rid, names[req.label], req.reviewer) not in stored]
    assert not missing, f"{len(missing)} acknowledged labels are not in the store, e.g. {missing[:5]}"
