"""The gRPC service against a real server on 127.0.0.1: stubs over real channels, no mocks.

Most tests start workers in-process (``start_worker`` on an asyncio loop running in a background
thread, port 0) and call them with the generated sync stubs. Shutdown on SIGTERM and the
multi-process mode need a real process: those tests run ``python -m outlierd serve``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import ROOT, dataset_path, LoopThread
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.parser import text_string_to_metric_families

from outlierd.core import ArtifactError, DeviceError, InvalidInputError, load_model
from outlierd.core.registry import Registry
from outlierd.monitoring.metrics import ServiceMetrics
from outlierd.v1 import scoring_pb2 as pb
from outlierd.v1 import scoring_pb2_grpc as pb_grpc
from outlierd.server.app import start_worker
from outlierd.server.client import ScorerClient, request
from outlierd.server.settings import ServeSettings

SERVICE = "outlierd.v1.Scorer"
D = 21  # cardio's features
VERSION = 2  # the module registry's cardio champion (version 1 exists too, so "2" is not an accident)
MAX_REQUEST_RECORDS = 2000
DENIED = "missing or invalid bearer token (metadata 'authorization: Bearer <token>')"
TIMEOUT = 10.0


# ---------------------------------------------------------------------------------------------
# fixtures: one registry per module, an event loop in a thread, in-process workers
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def X() -> np.ndarray:
    arr = np.loadtxt(dataset_path("cardio"), delimiter=",", skiprows=1)
    return arr[:, :-1]


@pytest.fixture(scope="module")
def registry_dir(tmp_path_factory, X) -> Path:
    """cardio v1, v2 (champion: v2); strict v1 (missing='reject'); hot v1 (for the reload test)."""
    from sklearn.ensemble import IsolationForest

    from outlierd.training.export import export_sklearn
    from outlierd.training.train import train

    root = tmp_path_factory.mktemp("registry")
    reg_dir = root / "reg"
    first = train(dataset_path("cardio"), reg_dir, "cardio", label_column="label", quiet=True)
    reg = Registry(reg_dir)
    assert reg.publish("cardio", first.path, aliases=("champion",)) == VERSION
    forest = IsolationForest(n_estimators=25, random_state=0).fit(X)
    strict = export_sklearn(forest, root / "strict-artifact", missing="reject", X_train=X)
    assert reg.publish("strict", strict, aliases=("champion",)) == 1
    assert reg.publish("hot", first.path, aliases=("champion",)) == 1
    return reg_dir


@pytest.fixture(scope="module")
def served_model(registry_dir):
    return load_model(Registry(registry_dir).path("cardio", VERSION))


@pytest.fixture(scope="module")
def loop_thread():
    lt = LoopThread()
    yield lt
    lt.close()


class Running:
    def __init__(self, worker, metrics_registry: CollectorRegistry):
        self.worker = worker
        self.metrics = metrics_registry
        self.target = f"127.0.0.1:{worker.port}"

    def sample(self, name: str, labels: dict[str, str] | None = None) -> float:
        value = self.metrics.get_sample_value(name, labels or {})
        return 0.0 if value is None else value


@contextlib.contextmanager
def serving(loop_thread: LoopThread, registry_dir: Path, **overrides):
    """A worker on 127.0.0.1, port 0, with its own fresh Prometheus registry."""
    kw = {"registry": registry_dir, "model": "cardio", "host": "127.0.0.1", "port": 0, "max_request_records": MAX_REQUEST_RECORDS}
    kw.update(overrides)
    settings = ServeSettings(**kw)
    settings.validate()
    metrics_registry = CollectorRegistry()
    worker = loop_thread.call(start_worker(settings, ServiceMetrics(metrics_registry)))
    try:
        yield Running(worker, metrics_registry)
    finally:
        loop_thread.call(worker.stop(1.0))


@pytest.fixture(scope="module")
def server(loop_thread, registry_dir):
    with serving(loop_thread, registry_dir) as running:
        yield running


@pytest.fixture(scope="module")
def channel(server):
    ch = grpc.insecure_channel(server.target)
    yield ch
    ch.close()


@pytest.fixture(scope="module")
def stub(channel):
    return pb_grpc.ScorerStub(channel)


def rpc_error(fn, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        fn(*args, timeout=kwargs.pop("timeout", TIMEOUT), **kwargs)
    return info.value


def assert_scored(resp: pb.ScoreResponse, X: np.ndarray, model, version: int = VERSION, name: str = "cardio") -> np.ndarray:
    scores = np.asarray(resp.scores)
    expected = model.score(np.asarray(X, dtype=np.float32))
    assert resp.error == ""
    assert scores.shape == expected.shape
    np.testing.assert_allclose(scores, expected, rtol=0, atol=1e-6)
    assert list(resp.anomalous) == (scores >= model.threshold).tolist()
    assert resp.version == str(version)
    assert resp.model == name
    assert resp.device == "cpu"
    return scores


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def health_check(target: str, service: str = "", timeout: float = 2.0, metadata=None) -> int:
    with grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
        resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout, metadata=metadata)
        return resp.status


# ---------------------------------------------------------------------------------------------
# Score, ScoreStream, GetModelInfo
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 37, 1100])  # micro-batched, micro-batched, passes straight through (>= max_batch)
@pytest.mark.parametrize("raw", [True, False], ids=["raw_values", "values"])
def test_score_matches_core_model(stub, served_model, X, n, raw):
    rows = X[:n]
    ids = [f"rec-{i}" for i in range(n)]
    resp = stub.Score(request(rows, ids=ids, request_id=2**63 + 5, raw=raw), timeout=TIMEOUT)
    assert_scored(resp, rows, served_model)
    assert list(resp.ids) == ids
    assert resp.request_id == 2**63 + 5


def test_values_and_raw_values_agree(stub, X, served_model):
    rows = X[100:400]
    a = stub.Score(request(rows, raw=True), timeout=TIMEOUT)
    b = stub.Score(request(rows, raw=False), timeout=TIMEOUT)
    assert list(a.scores) == list(b.scores)
    assert list(a.anomalous) == list(b.anomalous)
    assert_scored(a, rows, served_model)


def test_score_whole_dataset_flags_some(stub, X, served_model):
    scores = assert_scored(stub.Score(request(X), timeout=TIMEOUT), X, served_model)
    assert 0 < int((scores >= served_model.threshold).sum()) < len(X)


def test_score_empty_request(stub):
    resp = stub.Score(pb.ScoreRequest(n_features=D, request_id=9), timeout=TIMEOUT)
    assert list(resp.scores) == [] and list(resp.anomalous) == []
    assert resp.request_id == 9 and resp.version == str(VERSION)


def test_score_stream_in_order_and_continues_after_invalid_message(stub, X, served_model):
    # Sizes mix the micro-batched path with one pass-through message (1100 records), so later
    # messages can finish first: the answers must still come back in request order.
    sizes = [1100, 3, 50, 1, 200, 7, 64, 2, 9, 30, 5, 1]
    bad = {2: "n_features", 5: "explain", 8: "shape"}
    reqs, rows = [], {}
    start = 0
    for i, n in enumerate(sizes):
        chunk = X[start:start + n]
        start = (start + n) % (len(X) - 1100)
        raw = i % 2 == 0
        if bad.get(i) == "n_features":
            req = request(chunk[:, :20], request_id=i, raw=raw)
        elif bad.get(i) == "explain":
            req = request(chunk, request_id=i, raw=raw)
            req.explain, req.top_k = True, D + 1
        elif bad.get(i) == "shape":
            req = pb.ScoreRequest(n_features=D, values=[1.0] * (D + 1), request_id=i)
        else:
            req = request(chunk, ids=[f"{i}/{j}" for j in range(n)], request_id=i, raw=raw)
            rows[i] = chunk
        reqs.append(req)
    responses = list(stub.ScoreStream(iter(reqs), timeout=TIMEOUT))
    assert [r.request_id for r in responses] == list(range(len(sizes)))
    errors = {i: r.error for i, r in enumerate(responses) if r.error}
    assert errors == {
        2: f"INVALID_ARGUMENT: n_features is 20; model 'cardio' version {VERSION} expects {D}",
        5: f"INVALID_ARGUMENT: explain: top_k must be in [1, {D}] (the model's number of features; 0 means 3); got {D + 1}",
        8: f"INVALID_ARGUMENT: values holds {D + 1} numbers: not a multiple of n_features={D}",
    }
    for i in errors:
        assert list(responses[i].scores) == []
    for i, chunk in rows.items():
        assert_scored(responses[i], chunk, served_model)
        assert list(responses[i].ids) == [f"{i}/{j}" for j in range(len(chunk))]


def test_score_stream_longer_than_inflight_window(stub, X, served_model):
    reqs = [request(X[i:i + 4], request_id=i) for i in range(40)]  # 40 messages > stream_inflight (8)
    responses = list(stub.ScoreStream(iter(reqs), timeout=TIMEOUT))
    assert [r.request_id for r in responses] == list(range(40))
    expected = served_model.score(X[:43].astype(np.float32))
    for i, r in enumerate(responses):
        np.testing.assert_allclose(r.scores, expected[i:i + 4], rtol=0, atol=1e-6)


def test_score_stream_all_invalid_still_answers_each(stub):
    reqs = [pb.ScoreRequest(model="nope", n_features=D, request_id=i) for i in range(3)]
    responses = list(stub.ScoreStream(iter(reqs), timeout=TIMEOUT))
    assert [r.error for r in responses] == ["NOT_FOUND: unknown model 'nope'; this server serves 'cardio'"] * 3
    assert [r.request_id for r in responses] == [0, 1, 2]


def test_get_model_info(stub, served_model):
    info = stub.GetModelInfo(pb.ModelInfoRequest(), timeout=TIMEOUT)
    assert info.model == "cardio"
    assert info.version == str(VERSION)
    assert list(info.feature_names) == served_model.feature_names and len(info.feature_names) == D
    assert info.threshold == served_model.threshold
    assert info.alias == "champion"
    assert stub.GetModelInfo(pb.ModelInfoRequest(model="cardio"), timeout=TIMEOUT).version == str(VERSION)
    err = rpc_error(stub.GetModelInfo, pb.ModelInfoRequest(model="nope"))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert err.details() == "unknown model 'nope'; this server serves 'cardio'"


def test_client_helper_round_trip(server, X, served_model):
    with ScorerClient(server.target) as client:
        res = client.score(X[:10], ids=list("abcdefghij"), request_id=3)
        assert res.version == VERSION and res.ids == list("abcdefghij") and res.request_id == 3
        np.testing.assert_allclose(res.scores, served_model.score(X[:10].astype(np.float32)), rtol=0, atol=1e-6)
        streamed = list(client.score_stream([X[:2], X[2:5]], raw=False))
        assert [len(s.scores) for s in streamed] == [2, 3] and [s.request_id for s in streamed] == [0, 1]
        assert client.model_info().version == str(VERSION)


# ---------------------------------------------------------------------------------------------
# health and reflection
# ---------------------------------------------------------------------------------------------


def test_health_serving(server):
    for service in ("", SERVICE):
        assert health_check(server.target, service) == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as info:
        health_check(server.target, "no.such.Service")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_services(channel):
    from google.protobuf.descriptor_pool import DescriptorPool
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    db = ProtoReflectionDescriptorDatabase(channel)
    services = set(db.get_services())
    assert {SERVICE, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= services
    scorer = DescriptorPool(db).FindServiceByName(SERVICE)
    assert {m.name for m in scorer.methods} == {"Score", "ScoreStream", "GetModelInfo", "SubmitFeedback", "SubmitFeedbackStream"}
    score = scorer.methods_by_name["ScoreStream"]
    assert score.input_type.full_name == "outlierd.v1.ScoreRequest"
    assert score.client_streaming and score.server_streaming


# ---------------------------------------------------------------------------------------------
# validation: every refusal with its status code and message
# ---------------------------------------------------------------------------------------------


def _req(n: int = 3, **kw) -> pb.ScoreRequest:
    kw.setdefault("n_features", D)
    if "values" not in kw and "raw_values" not in kw:
        kw["values"] = [0.5] * (n * D)
    return pb.ScoreRequest(**kw)


INVALID = [
    ("n_features", _req(n_features=20, values=[0.0] * 40),
     "INVALID_ARGUMENT", f"n_features is 20; model 'cardio' version {VERSION} expects {D}"),
    ("n_features", _req(n_features=0, values=[]),
     "INVALID_ARGUMENT", f"n_features is 0; model 'cardio' version {VERSION} expects {D}"),
    ("shape", _req(values=[0.0] * (2 * D + 1)),
     "INVALID_ARGUMENT", f"values holds {2 * D + 1} numbers: not a multiple of n_features={D}"),
    ("shape", _req(raw_values=b"\0" * (4 * D + 4)),
     "INVALID_ARGUMENT", f"raw_values holds {4 * D + 4} bytes: not a whole number of records of {D} little-endian float32 ({4 * D} bytes each)"),
    ("shape", _req(raw_values=b"\0" * (4 * D + 1)),
     "INVALID_ARGUMENT", f"raw_values holds {4 * D + 1} bytes: not a whole number of records of {D} little-endian float32 ({4 * D} bytes each)"),
    ("both_values", _req(values=[0.0] * D, raw_values=b"\0" * (4 * D)),
     "INVALID_ARGUMENT", "set either values or raw_values, not both"),
    ("ids", _req(3, ids=["a", "b"]),
     "INVALID_ARGUMENT", "ids has 2 entries for 3 records: send one id per record or none"),
    ("ids", _req(1, ids=["a", "b"]),
     "INVALID_ARGUMENT", "ids has 2 entries for 1 records: send one id per record or none"),
    ("unknown_model", _req(model="nope"),
     "NOT_FOUND", "unknown model 'nope'; this server serves 'cardio'"),
    ("too_large", _req(raw_values=b"\0" * (4 * D * (MAX_REQUEST_RECORDS + 1))),
     "INVALID_ARGUMENT", f"request holds {MAX_REQUEST_RECORDS + 1} records; the limit is {MAX_REQUEST_RECORDS} per request: split it"),
    ("explain", _req(explain=True, top_k=D + 1),
     "INVALID_ARGUMENT", f"explain: top_k must be in [1, {D}] (the model's number of features; 0 means 3); got {D + 1}"),
]


@pytest.mark.parametrize("reason,req,code,details", INVALID, ids=[f"{i}-{case[0]}" for i, case in enumerate(INVALID)])
def test_invalid_request_code_and_message(server, stub, reason, req, code, details):
    before = server.sample("outlierd_invalid_inputs_total", {"reason": reason})
    err = rpc_error(stub.Score, req)
    assert err.code() == getattr(grpc.StatusCode, code)
    assert err.details() == details
    assert server.sample("outlierd_invalid_inputs_total", {"reason": reason}) == before + 1
    # the same message on a stream answers with `error`, and the stream goes on
    ok = request(np.zeros((2, D)), request_id=7)
    responses = list(stub.ScoreStream(iter([req, ok]), timeout=TIMEOUT))
    assert responses[0].error == f"{code}: {details}"
    assert responses[1].error == "" and responses[1].request_id == 7 and len(responses[1].scores) == 2


def test_request_at_the_record_limit_is_accepted(stub):
    resp = stub.Score(_req(raw_values=b"\0" * (4 * D * MAX_REQUEST_RECORDS)), timeout=TIMEOUT)
    assert len(resp.scores) == MAX_REQUEST_RECORDS


def test_non_finite_values_against_reject_model(loop_thread, registry_dir, X):
    strict = load_model(Registry(registry_dir).path("strict", 1))
    assert strict.preprocessing.reject
    with serving(loop_thread, registry_dir, model="strict") as srv, grpc.insecure_channel(srv.target) as ch:
        stub = pb_grpc.ScorerStub(ch)
        for bad, raw in ((np.nan, True), (np.inf, False), (-np.inf, True)):
            rows = X[:4].copy()
            rows[2, 5] = bad
            err = rpc_error(stub.Score, request(rows, raw=raw))
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert err.details() == "record 2 contains NaN or inf and model 'strict' version 1 rejects non-finite values"
        assert srv.sample("outlierd_invalid_inputs_total", {"reason": "non_finite"}) == 3
        resp = stub.Score(request(X[:4]), timeout=TIMEOUT)  # finite records still score
        assert_scored(resp, X[:4], strict, version=1, name="strict")


def test_non_finite_values_imputed_by_default_model(stub, X, served_model):
    rows = X[:4].copy()
    rows[1, 0] = np.nan
    resp = stub.Score(request(rows), timeout=TIMEOUT)
    assert np.isfinite(resp.scores).all()
    assert_scored(resp, rows, served_model)


# ---------------------------------------------------------------------------------------------
# overload
# ---------------------------------------------------------------------------------------------


def test_flood_gets_resource_exhausted_then_server_recovers(loop_thread, registry_dir, X, served_model):
    # 2 records fit the queue at a time; the first request's batch waits 0.4 s for company, so
    # the rest of the flood finds the queue full.
    with serving(loop_thread, registry_dir, max_queue_records=2, max_delay_us=400_000, threads=1, max_batch=1024) as srv, \
            grpc.insecure_channel(srv.target) as ch:
        stub = pb_grpc.ScorerStub(ch)
        futures = [stub.Score.future(request(X[i:i + 2], request_id=i), timeout=TIMEOUT) for i in range(40)]
        # the admitted request waits in the micro-batcher's queue: the depth gauge shows it
        depths = set()
        deadline = time.monotonic() + 5
        while not all(f.done() for f in futures) and time.monotonic() < deadline:
            depths.add(srv.sample("outlierd_queue_depth_records"))
            time.sleep(0.002)
        assert depths <= {0.0, 2.0} and 2.0 in depths, depths
        ok, exhausted = [], []
        for i, fut in enumerate(futures):
            try:
                ok.append((i, fut.result()))
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (e.code(), e.details())
                assert e.details().startswith("server overloaded: ") and e.details().endswith("(limit 2); retry later")
                exhausted.append(i)
        assert ok, "no request of the flood got through"
        assert exhausted, "a queue of 2 records took 40 concurrent requests"
        for i, resp in ok:
            assert resp.request_id == i
            assert_scored(resp, X[i:i + 2], served_model)
        assert srv.sample("outlierd_overloaded_total") == len(exhausted)
        # the server keeps serving once the flood is over
        for _ in range(3):
            assert_scored(stub.Score(request(X[:2]), timeout=TIMEOUT), X[:2], served_model)
        assert srv.sample("outlierd_queue_depth_records") == 0
        assert health_check(srv.target) == health_pb2.HealthCheckResponse.SERVING


def test_deadline_and_cancel_free_queued_work(loop_thread, registry_dir, X, served_model):
    # Batches wait 0.5 s for company: a call with a 0.1 s deadline expires in the queue, and a
    # cancelled stream's queued messages are dropped; the batcher ends with nothing admitted.
    with serving(loop_thread, registry_dir, max_delay_us=500_000, threads=1) as srv, grpc.insecure_channel(srv.target) as ch:
        stub = pb_grpc.ScorerStub(ch)
        batcher = srv.worker.batcher
        err = rpc_error(stub.Score, request(X[:2]), timeout=0.1)
        assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED

        def forever():
            for i in range(1000):  # bounded
                yield request(X[:3], request_id=i)
                time.sleep(0.01)

        call = stub.ScoreStream(forever(), timeout=TIMEOUT)
        deadline = time.monotonic() + 5
        while batcher.inflight_records == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert batcher.inflight_records > 0
        call.cancel()
        deadline = time.monotonic() + 5
        while batcher.inflight_records and time.monotonic() < deadline:
            time.sleep(0.01)
        assert batcher.inflight_records == 0
        # the server is unharmed
        assert_scored(stub.Score(request(X[:2]), timeout=TIMEOUT), X[:2], served_model)


# ---------------------------------------------------------------------------------------------
# metrics (in-process, fresh CollectorRegistry)
# ---------------------------------------------------------------------------------------------


def test_metrics_after_calls(loop_thread, registry_dir, X, served_model):
    with serving(loop_thread, registry_dir) as srv, grpc.insecure_channel(srv.target) as ch:
        stub = pb_grpc.ScorerStub(ch)
        labels = {"model": "cardio", "version": str(VERSION)}
        assert srv.sample("outlierd_model_info", {**labels, "alias": "champion"}) == 1
        assert srv.sample("outlierd_records_scored_total", labels) == 0
        sizes = [5, 7, 1100]
        flagged = 0
        for i, n in enumerate(sizes):  # one after the other: one kernel call each
            resp = stub.Score(request(X[i * 10:i * 10 + n]), timeout=TIMEOUT)
            flagged += sum(resp.anomalous)
        list(stub.ScoreStream(iter([request(X[:3]), request(X[:4])]), timeout=TIMEOUT))
        total = sum(sizes) + 7
        assert srv.sample("outlierd_records_scored_total", labels) == total
        assert srv.sample("outlierd_anomalies_total", labels) >= flagged
        assert srv.sample("outlierd_batch_size_records_sum", {"model": "cardio"}) == total
        batches = srv.sample("outlierd_batch_size_records_count", {"model": "cardio"})
        assert len(sizes) + 1 <= batches <= len(sizes) + 2  # the two stream messages may share a batch
        assert srv.sample("outlierd_batch_size_records_bucket", {"model": "cardio", "le": "1024.0"}) == batches - 1
        assert srv.sample("outlierd_request_duration_seconds_count", {"method": "Score"}) == len(sizes)
        assert srv.sample("outlierd_request_duration_seconds_count", {"method": "ScoreStream"}) == 2
        assert srv.sample("outlierd_queue_depth_records") == 0

        for _reason, req, _, _ in INVALID:
            with pytest.raises(grpc.RpcError):
                stub.Score(req, timeout=TIMEOUT)
        expected: dict[str, int] = {}
        for reason, *_ in INVALID:
            expected[reason] = expected.get(reason, 0) + 1
        for reason, count in expected.items():
            assert srv.sample("outlierd_invalid_inputs_total", {"reason": reason}) == count, reason
        # refused requests score nothing
        assert srv.sample("outlierd_records_scored_total", labels) == total
        assert srv.sample("outlierd_request_duration_seconds_count", {"method": "Score"}) == len(sizes)


def test_hot_reload_swaps_version_and_metrics(loop_thread, registry_dir, X):
    reg = Registry(registry_dir)
    with serving(loop_thread, registry_dir, model="hot", reload_interval_s=0.05) as srv, grpc.insecure_channel(srv.target) as ch:
        stub = pb_grpc.ScorerStub(ch)
        assert stub.Score(request(X[:2]), timeout=TIMEOUT).version == "1"
        v2 = reg.publish("hot", reg.path("cardio", 1), aliases=("champion",))
        deadline = time.monotonic() + 15
        while stub.GetModelInfo(pb.ModelInfoRequest(), timeout=TIMEOUT).version != str(v2):
            assert time.monotonic() < deadline, "the server never picked up the new champion"
            time.sleep(0.05)
        assert stub.Score(request(X[:2]), timeout=TIMEOUT).version == str(v2)
        assert srv.sample("outlierd_model_reloads_total", {"model": "hot", "result": "ok"}) == 1
        assert srv.sample("outlierd_model_info", {"model": "hot", "version": "1", "alias": "champion"}) == 0
        assert srv.sample("outlierd_model_info", {"model": "hot", "version": str(v2), "alias": "champion"}) == 1


# ---------------------------------------------------------------------------------------------
# TLS and mutual TLS (certificates made at test time with the openssl CLI)
# ---------------------------------------------------------------------------------------------


def _openssl(cwd: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def _make_ca(d: Path, name: str) -> None:
    _openssl(d, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2", "-subj", f"/CN={name}",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")


def _make_leaf(d: Path, name: str, ca: str, serial: int, ext: str) -> None:
    _openssl(d, "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}")
    (d / f"{name}.ext").write_text(ext)
    _openssl(d, "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-set_serial", str(serial),
             "-days", "2", "-out", f"{name}.pem", "-extfile", f"{name}.ext")


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    if shutil.which("openssl") is None:
        pytest.skip("TLS tests need the openssl CLI (the cryptography package is not installed either)")
    d = tmp_path_factory.mktemp("certs")
    _make_ca(d, "ca")
    _make_ca(d, "other-ca")
    _make_leaf(d, "server", "ca", 2, "basicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _make_leaf(d, "client", "ca", 3, "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n")
    _make_leaf(d, "rogue", "other-ca", 4, "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n")
    return d


def _tls_client(srv: Running, certs: Path, client: str | None = None, **kw) -> ScorerClient:
    key = (certs / f"{client}.key").read_bytes() if client else None
    chain = (certs / f"{client}.pem").read_bytes() if client else None
    return ScorerClient(srv.target, root_certificates=(certs / "ca.pem").read_bytes(), private_key=key, certificate_chain=chain,
                        timeout=5.0, **kw)


def test_tls(loop_thread, registry_dir, certs, X, served_model):
    with serving(loop_thread, registry_dir, tls_cert=certs / "server.pem", tls_key=certs / "server.key") as srv:
        with _tls_client(srv, certs) as client:
            res = client.score(X[:5])
            np.testing.assert_allclose(res.scores, served_model.score(X[:5].astype(np.float32)), rtol=0, atol=1e-6)
        with _tls_client(srv, certs, server_name="localhost") as client:  # the DNS name in the certificate works too
            assert client.model_info().version == str(VERSION)
        with ScorerClient(srv.target, timeout=3.0) as plain:  # plaintext to a TLS port: refused
            with pytest.raises(grpc.RpcError) as info:
                plain.score(X[:1])
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        wrong_ca = (certs / "other-ca.pem").read_bytes()
        with ScorerClient(srv.target, root_certificates=wrong_ca, timeout=3.0) as untrusting:  # server cert not trusted
            with pytest.raises(grpc.RpcError) as info:
                untrusting.score(X[:1])
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls(loop_thread, registry_dir, certs, X):
    with serving(loop_thread, registry_dir, tls_cert=certs / "server.pem", tls_key=certs / "server.key",
                 tls_client_ca=certs / "ca.pem") as srv:
        with _tls_client(srv, certs) as anonymous:  # no client certificate
            with pytest.raises(grpc.RpcError) as info:
                anonymous.score(X[:1])
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        with _tls_client(srv, certs, "rogue") as rogue:  # a certificate from another CA
            with pytest.raises(grpc.RpcError) as info:
                rogue.score(X[:1])
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        with _tls_client(srv, certs, "client") as client:
            res = client.score(X[:3], ids=["a", "b", "c"])
            assert len(res.scores) == 3 and res.ids == ["a", "b", "c"] and res.version == VERSION
        assert srv.sample("outlierd_records_scored_total", {"model": "cardio", "version": str(VERSION)}) == 3


# ---------------------------------------------------------------------------------------------
# token auth
# ---------------------------------------------------------------------------------------------


def test_token_auth(loop_thread, registry_dir, X, served_model):
    token = "s3cret-token"
    with serving(loop_thread, registry_dir, auth_token=token) as srv, grpc.insecure_channel(srv.target) as ch:
        stub = pb_grpc.ScorerStub(ch)
        good = (("authorization", f"Bearer {token}"),)
        for metadata in (None, (("authorization", "Bearer wrong"),), (("authorization", token),),
                         (("authorization", f"bearer{token}"),), (("authorization", f"Basic {token}"),), (("x-token", token),)):
            for call, req in ((stub.Score, request(X[:1])), (stub.GetModelInfo, pb.ModelInfoRequest())):
                err = rpc_error(call, req, metadata=metadata)
                assert err.code() == grpc.StatusCode.UNAUTHENTICATED
                assert err.details() == DENIED
            err = rpc_error(lambda r, **kw: list(stub.ScoreStream(r, **kw)), iter([request(X[:1])]), metadata=metadata)
            assert err.code() == grpc.StatusCode.UNAUTHENTICATED and err.details() == DENIED
        # unknown methods stay UNIMPLEMENTED whatever the token
        err = rpc_error(ch.unary_unary(f"/{SERVICE}/NoSuchMethod"), b"")
        assert err.code() == grpc.StatusCode.UNIMPLEMENTED
        # the right token works on every RPC
        assert_scored(stub.Score(request(X[:6]), timeout=TIMEOUT, metadata=good), X[:6], served_model)
        assert stub.GetModelInfo(pb.ModelInfoRequest(), timeout=TIMEOUT, metadata=good).version == str(VERSION)
        streamed = list(stub.ScoreStream(iter([request(X[:2]), request(X[:3])]), timeout=TIMEOUT, metadata=good))
        assert [len(r.scores) for r in streamed] == [2, 3]
        with ScorerClient(srv.target, token=token) as client:
            assert client.score(X[:2]).version == VERSION
        # health checks need no token (orchestrators probe without secrets)
        for service in ("", SERVICE):
            assert health_check(srv.target, service) == health_pb2.HealthCheckResponse.SERVING
        # nothing was scored for the refused calls
        assert srv.sample("outlierd_records_scored_total", {"model": "cardio", "version": str(VERSION)}) == 6 + 5 + 2


# ---------------------------------------------------------------------------------------------
# real processes: graceful shutdown on SIGTERM, several workers and their aggregated metrics
# ---------------------------------------------------------------------------------------------


def _server_env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTLIERD_") and k != "PROMETHEUS_MULTIPROC_DIR"}
    env["TMPDIR"] = str(tmp)
    return env


@contextlib.contextmanager
def serve_process(tmp: Path, registry_dir: Path, *args: str):
    log = open(tmp / "server.log", "wb")
    cmd = [sys.executable, "-m", "outlierd", "serve", "--registry", str(registry_dir), "--model", "cardio",
           "--host", "127.0.0.1", *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_server_env(tmp), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    proc.log_path = tmp / "server.log"  # type: ignore[attr-defined]
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: the server and the workers it spawned
            proc.wait(10)
        log.close()


def _log(proc) -> str:
    return proc.log_path.read_text(errors="replace")[-4000:]


def _wait_serving(proc, target: str, timeout: float = 40.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, f"server exited with {proc.returncode}:\n{_log(proc)}"
        try:
            if health_check(target, SERVICE, timeout=1.0) == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.RpcError:
            pass
        assert time.monotonic() < deadline, f"server not serving after {timeout}s:\n{_log(proc)}"
        time.sleep(0.1)


def test_sigterm_graceful_shutdown(tmp_path, registry_dir, X, served_model):
    port, grace = free_port(), 6.0
    target = f"127.0.0.1:{port}"
    n_messages, pause = 12, 0.15
    with serve_process(tmp_path, registry_dir, "--port", str(port), "--metrics-port", "0", "--grace-s", str(grace)) as proc:
        _wait_serving(proc, target)
        ch = grpc.insecure_channel(target)
        stub, health_stub = pb_grpc.ScorerStub(ch), health_pb2_grpc.HealthStub(ch)
        watch = health_stub.Watch(health_pb2.HealthCheckRequest(service=SERVICE), timeout=30)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING

        def slow_requests():
            for i in range(n_messages):
                yield request(X[i * 3:i * 3 + 3], request_id=i)
                time.sleep(pause)

        responses = stub.ScoreStream(slow_requests(), timeout=30)
        first = next(responses)
        t_term = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        # health turns NOT_SERVING for watchers ...
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        # ... and then their Watch ends by itself, so an open watcher cannot hold shutdown for the grace
        assert list(watch) == []
        # ... and new calls on new connections are refused
        deadline = time.monotonic() + 5
        while True:
            try:
                status = health_check(target, SERVICE, timeout=1.0)
                assert status == health_pb2.HealthCheckResponse.NOT_SERVING
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.UNAVAILABLE, (e.code(), e.details())
                break
            assert time.monotonic() < deadline, "the server still takes new calls after SIGTERM"
            time.sleep(0.05)
        with grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)]) as fresh:
            err = rpc_error(pb_grpc.ScorerStub(fresh).Score, request(X[:1]), timeout=2.0)
            assert err.code() == grpc.StatusCode.UNAVAILABLE
        # the in-flight stream completes: every message sent, even after SIGTERM, is answered
        rest = list(responses)
        all_responses = [first, *rest]
        assert [r.request_id for r in all_responses] == list(range(n_messages))
        for i, r in enumerate(all_responses):
            assert_scored(r, X[i * 3:i * 3 + 3], served_model)
        assert proc.wait(grace + 5) == 0, _log(proc)
        elapsed = time.monotonic() - t_term
        assert elapsed < grace, f"exit took {elapsed:.1f}s, grace was {grace}s:\n{_log(proc)}"
        ch.close()
    text = (tmp_path / "server.log").read_text()
    assert "shutting down" in text and "stopped port=" in text, text[-2000:]


def _scrape(port: int) -> dict[str, list]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=3) as resp:
        text = resp.read().decode()
    samples: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples.setdefault(s.name, []).append(s)
    return samples


def _per_worker_records(tmp: Path) -> dict[str, float]:
    """outlierd_records_scored_total as each worker process wrote it (multiprocess files)."""
    out: dict[str, float] = {}
    for path in tmp.glob("outlierd-metrics-*/counter_*.db"):
        for item in MmapedDict.read_all_values_from_file(str(path)):
            key, value = item[0], item[1]
            if json.loads(key)[1] == "outlierd_records_scored_total":
                out[path.name] = out.get(path.name, 0.0) + value
    return out


def test_two_workers_end_to_end_metrics(tmp_path, registry_dir, X, served_model):
    port, metrics_port = free_port(), free_port()
    target = f"127.0.0.1:{port}"
    with serve_process(tmp_path, registry_dir, "--workers", "2", "--port", str(port), "--metrics-port", str(metrics_port),
                       "--grace-s", "3", "--threads", "1") as proc:
        # both workers up: each exports its model_info gauge with its pid
        deadline = time.monotonic() + 45
        while True:
            assert proc.poll() is None, f"server exited with {proc.returncode}:\n{_log(proc)}"
            try:
                info = [s for s in _scrape(metrics_port).get("outlierd_model_info", []) if s.value == 1]
            except OSError:
                info = []
            if len({s.labels.get("pid") for s in info}) == 2:
                break
            assert time.monotonic() < deadline, f"two workers not up:\n{_log(proc)}"
            time.sleep(0.2)
        assert {(s.labels["model"], s.labels["version"], s.labels["alias"]) for s in info} == {("cardio", str(VERSION), "champion")}
        _wait_serving(proc, target)

        # Each call on its own connection: SO_REUSEPORT spreads connections over the workers.
        # Keep going until both workers have scored something (bounded).
        total, calls = 0, 0
        deadline = time.monotonic() + 20
        while True:
            n = 1 + calls % 5
            with grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
                resp = pb_grpc.ScorerStub(ch).Score(request(X[calls:calls + n], request_id=calls), timeout=TIMEOUT)
            assert_scored(resp, X[calls:calls + n], served_model)
            total, calls = total + n, calls + 1
            per_worker = _per_worker_records(tmp_path)
            if calls >= 8 and len(per_worker) == 2 and all(v > 0 for v in per_worker.values()):
                break
            assert time.monotonic() < deadline, f"connections never reached both workers: {per_worker}"

        samples = _scrape(metrics_port)
        scored = samples["outlierd_records_scored_total"]
        assert {(s.labels["model"], s.labels["version"]) for s in scored} == {("cardio", str(VERSION))}
        assert sum(s.value for s in scored) == total  # one series, summed over both workers
        assert sum(per_worker.values()) == total and min(per_worker.values()) < total
        assert sum(s.value for s in samples["outlierd_batch_size_records_sum"]) == total
        assert sum(s.value for s in samples["outlierd_request_duration_seconds_count"] if s.labels["method"] == "Score") == calls
        assert sum(s.value for s in samples.get("outlierd_queue_depth_records", [])) == 0

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0, _log(proc)


# ---------------------------------------------------------------------------------------------
# a failing kernel: INTERNAL for that call (or that stream message), and the server keeps serving


SENTINEL = 12345.0  # a record with this first value makes the patched kernel raise


def _stream_one_at_a_time(stub, reqs: list) -> list:
    """ScoreStream responses to ``reqs``, each message sent only once the previous one is answered
    (so no batch mixes them)."""
    answered = threading.Event()

    def one_at_a_time():
        for r in reqs:
            answered.clear()
            yield r
            answered.wait(TIMEOUT)

    responses = []
    for resp in stub.ScoreStream(one_at_a_time(), timeout=TIMEOUT):
        responses.append(resp)
        answered.set()
    return responses


def test_kernel_failure_is_internal_and_the_server_keeps_serving(loop_thread, registry_dir, X, served_model):
    with serving(loop_thread, registry_dir) as running:
        model = running.worker.slot.current.model
        real = model.score

        def failing(Xb, parallel=None):
            if np.any(Xb[:, 0] == SENTINEL):
                raise RuntimeError("kernel exploded")
            return real(Xb, parallel=parallel)

        model.score = failing  # an instance attribute: only this server's loaded model
        bad = X[:3].copy()
        bad[1, 0] = SENTINEL
        with grpc.insecure_channel(running.target) as ch:
            stub = pb_grpc.ScorerStub(ch)
            e = rpc_error(stub.Score, request(bad, request_id=7))
            assert e.code() == grpc.StatusCode.INTERNAL
            assert e.details() == "internal error while scoring: kernel exploded"
            assert running.sample("outlierd_invalid_inputs_total", {"reason": "internal"}) == 1
            assert_scored(stub.Score(request(X[:5]), timeout=TIMEOUT), X[:5], served_model)

            # on a stream, one message at a time (so no batch mixes the bad one with others)
            responses = _stream_one_at_a_time(stub, [request(X[:4], request_id=1), request(bad, request_id=2),
                                                     request(X[4:9], request_id=3)])
        assert [r.request_id for r in responses] == [1, 2, 3]
        assert responses[1].error == "INTERNAL: internal error: kernel exploded" and list(responses[1].scores) == []
        assert_scored(responses[0], X[:4], served_model)
        assert_scored(responses[2], X[4:9], served_model)
        assert running.sample("outlierd_invalid_inputs_total", {"reason": "internal"}) == 2


@pytest.mark.parametrize("error, code", [
    (InvalidInputError("record 1: feature 'age' is out of the model's range"), grpc.StatusCode.INVALID_ARGUMENT),
    (ArtifactError("arrays.npz changed on disk since it was verified"), grpc.StatusCode.FAILED_PRECONDITION),
    (DeviceError("--device cuda: the GPU went away"), grpc.StatusCode.FAILED_PRECONDITION),
])
def test_core_error_while_scoring_reaches_the_caller_with_its_code(loop_thread, registry_dir, X, served_model, error, code):
    # a core error raised inside the kernel call (on a scoring thread) is answered with its own
    # status and message, on the unary call and on that stream message; the server keeps serving
    with serving(loop_thread, registry_dir) as running:
        model = running.worker.slot.current.model
        real = model.score

        def failing(Xb, parallel=None):
            if np.any(Xb[:, 0] == SENTINEL):
                raise error
            return real(Xb, parallel=parallel)

        model.score = failing
        bad = X[:3].copy()
        bad[1, 0] = SENTINEL
        with grpc.insecure_channel(running.target) as ch:
            stub = pb_grpc.ScorerStub(ch)
            e = rpc_error(stub.Score, request(bad, request_id=7))
            assert e.code() == code
            assert e.details() == str(error)

            responses = _stream_one_at_a_time(stub, [request(X[:4], request_id=1), request(bad, request_id=2),
                                                     request(X[4:9], request_id=3)])
        assert [r.request_id for r in responses] == [1, 2, 3]
        assert responses[1].error == f"{code.name}: {error}" and list(responses[1].scores) == []
        assert_scored(responses[0], X[:4], served_model)
        assert_scored(responses[2], X[4:9], served_model)


@pytest.mark.parametrize("n", [1, 2, 15, 16, 127, 128, 256, 4096, 20_000])
def test_packed_scores_equal_what_extend_builds(rng, n):
    from outlierd.server.servicer import _packed_scores

    scores = rng.normal(size=n) * 10.0 ** rng.integers(-300, 300, size=n)
    flagged = scores >= np.median(scores)
    if n > 1:
        scores[rng.integers(0, n)] = np.nan
    ref = pb.ScoreResponse(request_id=3, model="m", version="2")
    ref.scores.extend(scores.tolist())
    ref.anomalous.extend(flagged.tolist())
    got = pb.ScoreResponse(request_id=3, model="m", version="2")
    got.MergeFromString(_packed_scores(scores[::-1][::-1], flagged))  # a strided view too
    assert got.SerializeToString() == ref.SerializeToString()
    np.testing.assert_array_equal(np.array(got.scores), scores)
    assert list(got.anomalous) == flagged.tolist()
