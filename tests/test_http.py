"""The HTTP port (issue 17): OIP REST with tritonclient.http in its own process, JSON with curl, bad
bodies named, the bearer token, TLS, and a schemathesis fuzz of the OpenAPI document (no 500)."""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="fastapi is not installed (pip install outlierd[oip])")
pytest.importorskip("tritonclient.http", reason="tritonclient[http] is not installed")

from outlierd.core import load_model  # noqa: E402
from outlierd.core.registry import Registry  # noqa: E402

from conftest import LoopThread  # noqa: E402
from test_hardening_server import certs  # noqa: E402,F401 - fixture
from test_oip import assert_conformant, cardio, make_registry, records, run_client  # noqa: E402
from test_server import serving  # noqa: E402

TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def X() -> np.ndarray:
    return cardio()


@pytest.fixture(scope="module")
def registry_dir(tmp_path_factory, X) -> Path:
    return make_registry(tmp_path_factory.mktemp("http"), X)


@pytest.fixture(scope="module")
def loop_thread():
    lt = LoopThread()
    yield lt
    lt.close()


@pytest.fixture(scope="module")
def server(loop_thread, registry_dir):
    with serving(loop_thread, registry_dir, http_port=0, max_request_records=1 << 20) as running:
        running.url = f"http://127.0.0.1:{running.worker.http_port}"
        yield running


@pytest.fixture(scope="module")
def model(registry_dir):
    return load_model(Registry(registry_dir).path("cardio", 1))


def call(url: str, body: bytes | None = None, headers: dict[str, str] | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_tritonclient_http_conformance(server, model, X, rng, tmp_path):
    data = records(X, rng)
    out = run_client("http", server.url.removeprefix("http://"), "cardio", data, tmp_path)
    meta = assert_conformant(out, data, model, ("raw", "typed"))
    assert meta["live"] and meta["ready"] and meta["model_ready"]
    assert meta["meta"]["name"] == "cardio" and meta["meta"]["versions"] == ["1"]
    assert meta["version-one-FP32"] == "1"


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs the curl CLI")
def test_curl_json_score(server, model, X):
    body = json.dumps({"records": X[:5].tolist(), "ids": list("abcde"), "explain": True, "top_k": 2})
    proc = subprocess.run(["curl", "-sS", "-X", "POST", "-H", "Content-Type: application/json", "--data-binary", body,
                           f"{server.url}/v1/models/cardio/score"], capture_output=True, text=True, timeout=30, check=True)
    answer = json.loads(proc.stdout)
    want = model.score(X[:5].astype(np.float32))
    np.testing.assert_allclose(answer["scores"], want, rtol=1e-6)
    assert answer["anomalous"] == (want >= model.threshold).tolist()
    assert answer["model"] == "cardio" and answer["version"] == "1" and answer["ids"] == list("abcde")
    assert [e["record"] for e in answer["explanations"]] == [0, 1, 2, 3, 4]
    assert all(len(e["features"]) == 2 and e["features"][0] in model.feature_names for e in answer["explanations"])
    # the OIP REST route with JSON data, by hand as a curl user would
    status, answer = call(f"{server.url}/v2/models/cardio/infer", json.dumps(
        {"id": "q1", "inputs": [{"name": "X", "shape": [5, X.shape[1]], "datatype": "FP64", "data": X[:5].ravel().tolist()}]}).encode())
    assert status == 200 and answer["id"] == "q1"
    np.testing.assert_allclose(answer["outputs"][0]["data"], model.score(X[:5]), rtol=1e-6)


@pytest.mark.parametrize("path, body, status, words", [
    ("/v1/models/cardio/score", b"{not json", 422, "json"),
    ("/v1/models/cardio/score", b'{"records": [[1, "x"]]}', 422, "records"),
    ("/v1/models/cardio/score", b'{"records": [[1, 2]]}', 400, "n_features"),
    ("/v1/models/cardio/score", b'{"records": [[1, 2], [1]]}', 400, "records"),
    ("/v1/models/cardio/score", b'{"records": [], "top_k": -1}', 422, "top_k"),
    ("/v1/models/cardio/score", b'{"rows": []}', 422, "records"),
    ("/v1/models/nope/score", b'{"records": []}', 404, "unknown model"),
    ("/v2/models/cardio/infer", b"[1]", 400, "inputs"),
    ("/v2/models/cardio/infer", b'{"inputs": [{"name": "X", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}]}', 400, "shape"),
    ("/v2/models/cardio/infer", b'{"inputs": [{"name": "X", "shape": [1, 21], "datatype": "INT8", "data": [1]}]}', 400, "datatype"),
    ("/v2/models/cardio/infer", b'{"inputs": [{"name": "X", "shape": [2, 21], "datatype": "FP32", "data": [1]}]}', 400, "values"),
    ("/v2/models/cardio/infer", b'{"inputs": [{"name": "X", "shape": [1, 21], "datatype": "FP32", "data": ["a"]}]}', 400, "data"),
    ("/v2/models/cardio/versions/7/infer", b'{"inputs": []}', 404, "version"),
])
def test_bad_bodies_are_named(server, path, body, status, words):
    got, answer = call(server.url + path, body)
    assert got == status, answer
    assert words in json.dumps(answer).lower()
    ok, _ = call(f"{server.url}/v1/models/cardio/score", b'{"records": []}')
    assert ok == 200


def test_openapi_lists_routes(server):
    status, doc = call(f"{server.url}/openapi.json")
    assert status == 200 and doc["openapi"].startswith("3.")
    for route in ("/v2/health/live", "/v2/models/{name}/infer", "/v1/models/{name}/score", "/v1/models/{name}/feedback"):
        assert route in doc["paths"]
    with urllib.request.urlopen(f"{server.url}/docs", timeout=10) as r:
        assert b"swagger" in r.read().lower()
    validator = pytest.importorskip("openapi_spec_validator", reason="openapi-spec-validator is not installed")
    validator.validate(doc)  # raises, naming the offending part, when the document is not valid OpenAPI


def test_schemathesis_fuzz_finds_no_500(server):
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings

    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    failures: list = []
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 10
    for operation in operations:
        @settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(case=operation.as_strategy())
        def check(case) -> None:
            response = case.call(base_url=server.url)
            if response.status_code >= 500:
                failures.append((case.method, case.formatted_path, case.body, response.status_code, response.text[:300]))

        check()
    assert not failures, failures[:3]
    assert call(f"{server.url}/v2/health/ready")[0] == 200


def test_token_required_but_not_for_health(loop_thread, registry_dir, X):
    with serving(loop_thread, registry_dir, http_port=0, auth_token=TOKEN) as running:
        url = f"http://127.0.0.1:{running.worker.http_port}"
        body = json.dumps({"records": X[:2].tolist()}).encode()
        assert call(f"{url}/v1/models/cardio/score", body)[0] == 401
        assert call(f"{url}/v1/models/cardio/score", body, {"Authorization": "Bearer wrong"})[0] == 401
        assert call(f"{url}/v2/models/cardio", None, {"Authorization": "Bearer wrong"})[0] == 401
        assert call(f"{url}/v1/models/cardio/score", body, {"Authorization": f"Bearer {TOKEN}"})[0] == 200
        assert call(f"{url}/v2/health/live")[0] == 200


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs the curl CLI")
def test_tls_on_the_http_port(loop_thread, registry_dir, certs, model, X):  # noqa: F811 - fixture
    with serving(loop_thread, registry_dir, http_port=0, tls_cert=certs / "server.pem", tls_key=certs / "server.key") as running:
        url = f"https://127.0.0.1:{running.worker.http_port}"
        body = json.dumps({"records": X[:3].tolist()})
        proc = subprocess.run(["curl", "-sS", "--cacert", str(certs / "server.pem"), "-H", "Content-Type: application/json",
                               "--data-binary", body, f"{url}/v1/models/cardio/score"], capture_output=True, text=True, timeout=30)
        assert proc.returncode == 0, proc.stderr
        np.testing.assert_allclose(json.loads(proc.stdout)["scores"], model.score(X[:3].astype(np.float32)), rtol=1e-6)
        plain = subprocess.run(["curl", "-sS", f"http://127.0.0.1:{running.worker.http_port}/v2/health/live"],
                               capture_output=True, text=True, timeout=30)
        assert "live" not in plain.stdout  # no plain HTTP on a TLS port


def test_feedback_route(server):
    status, answer = call(f"{server.url}/v1/models/cardio/feedback", json.dumps({"record_id": "r-1", "label": "anomaly"}).encode())
    assert status == 200 and answer["stored"] is True
    status, answer = call(f"{server.url}/v1/models/cardio/feedback", json.dumps({"record_id": "r-1", "label": "maybe"}).encode())
    assert status == 422 and "label" in json.dumps(answer)


def test_http_and_oip_requests_count_in_the_same_metrics(loop_thread, registry_dir, X):
    with serving(loop_thread, registry_dir, http_port=0) as running:
        url = f"http://127.0.0.1:{running.worker.http_port}"
        labels = {"model": "cardio", "version": "1"}
        before = running.sample("outlierd_records_scored_total", labels)
        assert call(f"{url}/v1/models/cardio/score", json.dumps({"records": X[:7].tolist()}).encode())[0] == 200
        assert call(f"{url}/v2/models/cardio/infer", json.dumps({"inputs": [
            {"name": "X", "shape": [3, X.shape[1]], "datatype": "FP32", "data": X[:3].ravel().tolist()}]}).encode())[0] == 200
        assert call(f"{url}/v1/models/cardio/score", b'{"records": [[1, 2]]}')[0] == 400
        assert running.sample("outlierd_records_scored_total", labels) == before + 10
        assert running.sample("outlierd_request_duration_seconds_count", {"method": "http"}) == 2
        assert running.sample("outlierd_invalid_inputs_total", {"reason": "n_features"}) == 1
