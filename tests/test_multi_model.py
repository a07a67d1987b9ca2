"""Several models in one server (issue 17): three models hot-reloaded independently under load with
zero failed calls and every answer equal to its own model version's scores; ``--models all`` picks
up a model published later; the CLI forms ``--model A --model B`` and ``--models all``."""

from __future__ import annotations

import http.client
import json
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from outlierd.cli import main
from outlierd.core import load_model
from outlierd.core.registry import Registry
from outlierd.v1 import scoring_pb2 as pb
from outlierd.v1 import scoring_pb2_grpc as pb_grpc

import outlierd.server.workers
from conftest import LoopThread, dataset_path
from test_server import serving

NAMES = ("alpha", "beta", "gamma")


@pytest.fixture(scope="module")
def X() -> np.ndarray:
    return np.loadtxt(dataset_path("cardio"), delimiter=",", skiprows=1)[:, :-1]


def publish(reg: Registry, root: Path, name: str, seed: int, X: np.ndarray, aliases=("champion",)) -> int:
    from sklearn.ensemble import IsolationForest

    from outlierd.training.export import export_sklearn

    forest = IsolationForest(n_estimators=20, random_state=seed).fit(X)
    return reg.publish(name, export_sklearn(forest, root / f"{name}-{seed}", X_train=X), aliases=aliases)


@pytest.fixture(scope="module")
def registry_dir(tmp_path_factory, X) -> Path:
    """alpha, beta, gamma: v1 (champion) and v2 (not yet served), each from its own forest."""
    root = tmp_path_factory.mktemp("multi")
    reg = Registry(root / "reg")
    for i, name in enumerate(NAMES):
        publish(reg, root, name, 10 * i, X)
        publish(reg, root, name, 10 * i + 1, X, aliases=())
    return root / "reg"


@pytest.fixture(scope="module")
def loop_thread():
    lt = LoopThread()
    yield lt
    lt.close()


def score_grpc(ch: grpc.Channel, conn: Any, name: str, x: np.ndarray) -> tuple[str, int, np.ndarray]:
    resp = pb_grpc.ScorerStub(ch).Score(pb.ScoreRequest(model=name, n_features=x.shape[1], raw_values=x.tobytes()), timeout=10)
    return resp.model, int(resp.version), np.asarray(resp.scores)


def score_oip(ch: grpc.Channel, conn: Any, name: str, x: np.ndarray) -> tuple[str, int, np.ndarray]:
    from tritonclient.grpc import service_pb2 as ipb

    req = ipb.ModelInferRequest(model_name=name)
    req.inputs.add(name="X", datatype="FP32", shape=list(x.shape))
    req.raw_input_contents.append(x.tobytes())
    resp = ch.unary_unary("/inference.GRPCInferenceService/ModelInfer", request_serializer=ipb.ModelInferRequest.SerializeToString,
                          response_deserializer=ipb.ModelInferResponse.FromString)(req, timeout=10)
    return resp.model_name, int(resp.model_version), np.frombuffer(resp.raw_output_contents[0], "<f8")


def score_http(ch: grpc.Channel, conn: Any, name: str, x: np.ndarray) -> tuple[str, int, np.ndarray]:
    conn.request("POST", f"/v1/models/{name}/score", json.dumps({"records": x.tolist()}), {"Content-Type": "application/json"})
    r = conn.getresponse()
    body = json.loads(r.read())
    if r.status != 200:
        raise RuntimeError(f"HTTP {r.status}: {body}")
    return body["model"], int(body["version"]), np.asarray(body["scores"])


def test_three_models_hot_reloaded_independently_under_load(loop_thread, registry_dir, X, rng):
    reg = Registry(registry_dir)
    models = {(n, v): load_model(reg.path(n, v)) for n in NAMES for v in (1, 2)}
    sample = X[rng.integers(0, X.shape[0], 64)].astype(np.float32)
    want = {key: m.score(sample) for key, m in models.items()}
    stop = threading.Event()
    seen: dict[str, dict[int, int]] = {n: {} for n in NAMES}
    failures: list[str] = []
    with serving(loop_thread, registry_dir, model="alpha", models="beta,gamma", reload_interval_s=0.05, http_port=0) as running:
        def load(name: str) -> None:
            # each model through another door: alpha the Scorer, beta the Open Inference Protocol, gamma HTTP JSON
            door = {"alpha": score_grpc, "beta": score_oip, "gamma": score_http}[name]
            with grpc.insecure_channel(running.target) as ch:
                conn = http.client.HTTPConnection("127.0.0.1", running.worker.http_port, timeout=10)
                while not stop.is_set():
                    try:
                        model, v, scores = door(ch, conn, name, sample)
                    except Exception as e:
                        failures.append(f"{name}: {e!r}")
                        continue
                    if model != name or not np.allclose(scores, want[(name, v)], rtol=1e-6, atol=1e-9):
                        failures.append(f"{name}: answer of {model} v{v} differs from its own scores")
                    seen[name][v] = seen[name].get(v, 0) + 1
                conn.close()

        threads = [threading.Thread(target=load, args=(n,)) for n in NAMES for _ in range(2)]
        for t in threads:
            t.start()
        try:
            for name in NAMES:  # one model at a time; the others keep their version
                time.sleep(0.4)
                reg.set_alias(name, "champion", 2)
                deadline = time.monotonic() + 10
                while seen[name].get(2, 0) < 3 and time.monotonic() < deadline:
                    time.sleep(0.02)
                others = [n for n in NAMES if n != name and n not in NAMES[:NAMES.index(name)]]
                for other in others:  # not reloaded yet: still version 1
                    assert running.worker.plane.models[other].current.version == 1
            time.sleep(0.3)
        finally:
            stop.set()
            for t in threads:
                t.join(15)
        info = pb_grpc.ScorerStub(grpc.insecure_channel(running.target)).GetModelInfo(pb.ModelInfoRequest())
    assert not failures, failures[:5]
    for name in NAMES:
        assert seen[name].get(1, 0) > 0 and seen[name].get(2, 0) > 0, seen
    assert info.model == "alpha" and list(info.served_models) == list(NAMES)


def test_models_all_picks_up_a_new_model_without_restart(loop_thread, tmp_path, X):
    reg = Registry(tmp_path / "reg")
    publish(reg, tmp_path, "one", 1, X)
    publish(reg, tmp_path, "two", 2, X)
    publish(reg, tmp_path, "unserved", 3, X, aliases=())  # no champion alias: not served
    with serving(loop_thread, tmp_path / "reg", model="", models="all", reload_interval_s=0.05) as running:
        assert list(running.worker.plane.models) == ["one", "two"]
        publish(reg, tmp_path, "three", 4, X)
        want = load_model(reg.path("three", 1)).score(X[:8].astype(np.float32))
        stub = pb_grpc.ScorerStub(grpc.insecure_channel(running.target))
        deadline = time.monotonic() + 15
        while "three" not in running.worker.plane.models and time.monotonic() < deadline:
            time.sleep(0.05)
        resp = stub.Score(pb.ScoreRequest(model="three", n_features=X.shape[1], raw_values=X[:8].astype(np.float32).tobytes()))
        np.testing.assert_allclose(resp.scores, want, rtol=1e-6)
        with pytest.raises(grpc.RpcError) as e:
            stub.Score(pb.ScoreRequest(model="unserved", n_features=X.shape[1], raw_values=X[:1].astype(np.float32).tobytes()))
        assert e.value.code() == grpc.StatusCode.NOT_FOUND and "'one', 'two', 'three'" in e.value.details()


@pytest.fixture
def captured(monkeypatch):
    got = {}
    monkeypatch.setattr(outlierd.server.workers, "serve", lambda s: got.setdefault("settings", s) and 0)
    for var in ("OUTLIERD_REGISTRY", "OUTLIERD_MODEL", "OUTLIERD_MODELS"):
        monkeypatch.delenv(var, raising=False)
    return got


def test_cli_forms(captured, tmp_path):
    main(["serve", "--registry", str(tmp_path), "--model", "a", "--model", "b", "--model", "c"])
    assert (captured["settings"].model, captured["settings"].models) == ("a", "b,c")
    captured.clear()
    main(["serve", "--registry", str(tmp_path), "--models", "all"])
    assert (captured["settings"].model, captured["settings"].models) == ("", "all")
    captured.clear()
    main(["serve", "--registry", str(tmp_path), "--model", "a"])
    assert (captured["settings"].model, captured["settings"].models) == ("a", None)


def test_feedback_is_stored_under_each_requests_model(loop_thread, registry_dir, tmp_path):
    from outlierd.monitoring.store import open_store

    fb = tmp_path / "fb.sqlite"
    with serving(loop_thread, registry_dir, model="alpha", models="beta", feedback_store=fb) as running:
        stub = pb_grpc.ScorerStub(grpc.insecure_channel(running.target))
        stub.SubmitFeedback(pb.FeedbackRequest(model="beta", record_id="b-1", label=pb.ANOMALY))
        stub.SubmitFeedback(pb.FeedbackRequest(record_id="a-1", label=pb.NORMAL))  # the default model
        acks = list(stub.SubmitFeedbackStream(iter([pb.FeedbackRequest(model="beta", record_id="b-2", label=pb.NORMAL),
                                                    pb.FeedbackRequest(model="alpha", record_id="a-2", label=pb.ANOMALY)])))
        assert all(a.stored for a in acks)
    store = open_store(fb)
    try:
        assert sorted(r.record_id for r in store.labels("alpha")) == ["a-1", "a-2"]
        assert sorted(r.record_id for r in store.labels("beta")) == ["b-1", "b-2"]
    finally:
        store.close()


def test_serve_two_workers_two_models_grpc_and_http(registry_dir, X, tmp_path):
    """`outlierd serve --model alpha --model beta --workers 2 --http-port`: real processes; both
    models answer on both ports, the HTTP port shared by the workers as the gRPC one is."""
    import json
    import os
    import signal
    import subprocess
    import sys
    import urllib.request

    from test_server import free_port

    port, http_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTLIERD_") and k != "PROMETHEUS_MULTIPROC_DIR"}
    proc = subprocess.Popen([sys.executable, "-m", "outlierd", "serve", "--registry", str(registry_dir), "--model", "alpha",
                             "--model", "beta", "--workers", "2", "--host", "127.0.0.1", "--port", str(port), "--http-port",
                             str(http_port), "--metrics-port", str(free_port()), "--feedback-store", str(tmp_path / "fb.sqlite")],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        reg = Registry(registry_dir)
        x = X[:4].astype(np.float32)
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/v1/models", timeout=2) as r:
                    listed = json.loads(r.read())
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() is not None else "timeout"
                time.sleep(0.2)
        assert [m["name"] for m in listed["models"]] == ["alpha", "beta"]
        stub = pb_grpc.ScorerStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
        for name in ("alpha", "beta"):
            version = Registry(registry_dir).resolve(name, "champion")
            want = load_model(reg.path(name, version)).score(x)
            resp = stub.Score(pb.ScoreRequest(model=name, n_features=x.shape[1], raw_values=x.tobytes()), timeout=10)
            np.testing.assert_allclose(resp.scores, want, rtol=1e-6)
            for _ in range(4):  # new connections: either worker answers
                req = urllib.request.Request(f"http://127.0.0.1:{http_port}/v1/models/{name}/score", data=json.dumps(
                    {"records": x.tolist()}).encode(), headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(req, timeout=10) as r:
                    np.testing.assert_allclose(json.loads(r.read())["scores"], want, rtol=1e-6)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
