"""The Open Inference Protocol over gRPC (issue 17): tritonclient in its own process against an
in-process worker; scores compared with ``load_model(v).score``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest

pytest.importorskip("tritonclient.grpc", reason="tritonclient is not installed (pip install outlierd[oip])")

from tritonclient.grpc import service_pb2 as pb  # noqa: E402
from tritonclient.grpc import service_pb2_grpc as pb_grpc  # noqa: E402

from outlierd.core import load_model  # noqa: E402
from outlierd.core.registry import Registry  # noqa: E402

from conftest import LoopThread, dataset_path  # noqa: E402
from test_server import serving  # noqa: E402

CLIENTS = Path(__file__).with_name("oip_clients.py")


def cardio() -> np.ndarray:
    return np.loadtxt(dataset_path("cardio"), delimiter=",", skiprows=1)[:, :-1]


def make_registry(root: Path, X: np.ndarray, names: tuple[str, ...] = ("cardio", "other")) -> Path:
    """A registry with one small IsolationForest per name (version 1, champion)."""
    from sklearn.ensemble import IsolationForest

    from outlierd.training.export import export_sklearn

    reg = Registry(root / "reg")
    for seed, name in enumerate(names):
        forest = IsolationForest(n_estimators=30, random_state=seed).fit(X)
        reg.publish(name, export_sklearn(forest, root / f"{name}-artifact", X_train=X), aliases=("champion",))
    return root / "reg"


@pytest.fixture(scope="module")
def X() -> np.ndarray:
    return cardio()


@pytest.fixture(scope="module")
def registry_dir(tmp_path_factory, X) -> Path:
    return make_registry(tmp_path_factory.mktemp("oip"), X)


@pytest.fixture(scope="module")
def loop_thread():
    lt = LoopThread()
    yield lt
    lt.close()


@pytest.fixture(scope="module")
def server(loop_thread, registry_dir):
    with serving(loop_thread, registry_dir, max_request_records=1 << 20) as running:
        yield running


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.target) as ch:
        yield pb_grpc.GRPCInferenceServiceStub(ch)


def records(X: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    many = X[rng.integers(0, X.shape[0], 4096)] + rng.normal(0, 0.01, (4096, X.shape[1]))
    return {"one": X[rng.integers(0, X.shape[0], 1)], "many": many}


def run_client(kind: str, target: str, model: str, data: dict[str, np.ndarray], tmp_path: Path, python: str = sys.executable,
               env: dict[str, str] | None = None) -> dict:
    src, dst = tmp_path / f"{kind}-in.npz", tmp_path / f"{kind}-out.npz"
    np.savez(src, **data)
    proc = subprocess.run([python, str(CLIENTS), kind, target, model, str(src), str(dst)],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with np.load(dst) as f:
        return {k: f[k] for k in f.files}


def assert_conformant(out: dict, data: dict[str, np.ndarray], model, kinds: tuple[str, ...]) -> dict:
    for key, X in data.items():
        for datatype, dtype in (("FP32", np.float32), ("FP64", np.float64)):
            want = model.score(X.astype(dtype))
            for kind in kinds:
                got = out[f"{kind}-{key}-{datatype}"]
                assert got.dtype == np.float64 and got.shape == (X.shape[0],)
                np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9, err_msg=f"{kind} {key} {datatype}")
            np.testing.assert_array_equal(out[f"raw-{key}-{datatype}-flags"], want >= model.threshold)
    return json.loads(str(out["meta"]))


def test_tritonclient_grpc_conformance(server, registry_dir, X, rng, tmp_path):
    model = load_model(Registry(registry_dir).path("cardio", 1))
    data = records(X, rng)
    out = run_client("grpc", server.target, "cardio", data, tmp_path)
    meta = assert_conformant(out, data, model, ("raw", "typed"))
    np.testing.assert_allclose(out["stream-many-FP32"], model.score(data["many"].astype(np.float32)), rtol=1e-6, atol=1e-9)
    assert meta["live"] and meta["ready"] and meta["model_ready"]
    assert meta["server"]["name"] == "outlierd"
    assert meta["meta"]["name"] == "cardio" and meta["meta"]["versions"] == ["1"]
    assert meta["meta"]["inputs"][0] == {"name": "X", "datatype": "FP32", "shape": ["-1", str(X.shape[1])]}
    assert meta["config"]["config"]["input"][0]["name"] == "X"
    assert meta["version-many-FP64"] == "1"
    assert meta["stream_ids"] == [str(i) for i in range(8)] and not meta["stream_errors"]
    assert meta["statistics"] == "UNIMPLEMENTED"


def test_explain_outputs(stub, registry_dir, X):
    model = load_model(Registry(registry_dir).path("cardio", 1))
    x = X[:16].astype(np.float32)
    req = pb.ModelInferRequest(model_name="cardio")
    req.inputs.add(name="X", datatype="FP32", shape=list(x.shape))
    req.raw_input_contents.append(x.tobytes())
    req.parameters["explain"].bool_param = True
    req.parameters["top_k"].int64_param = 2
    resp = stub.ModelInfer(req)
    got = {o.name: (o, raw) for o, raw in zip(resp.outputs, resp.raw_output_contents)}
    scores, features, contributions = model.score_explain(x, 2, False, threshold=model.threshold)
    np.testing.assert_allclose(np.frombuffer(got["score"][1], "<f8"), scores, rtol=1e-6)
    assert list(got["explain_features"][0].shape) == [16, 2]
    np.testing.assert_array_equal(np.frombuffer(got["explain_features"][1], "<i8").reshape(16, 2), features)
    np.testing.assert_allclose(np.frombuffer(got["explain_contributions"][1], "<f8").reshape(16, 2), contributions, rtol=1e-6)


@pytest.mark.parametrize("mutate, code, words", [
    (lambda r: setattr(r, "model_name", "nope"), grpc.StatusCode.NOT_FOUND, "unknown model"),
    (lambda r: r.inputs[0].shape.__setitem__(1, 3), grpc.StatusCode.INVALID_ARGUMENT, "shape"),
    (lambda r: setattr(r.inputs[0], "datatype", "INT8"), grpc.StatusCode.INVALID_ARGUMENT, "datatype"),
    (lambda r: r.raw_input_contents.__setitem__(0, b"\0" * 7), grpc.StatusCode.INVALID_ARGUMENT, "raw contents"),
    (lambda r: setattr(r, "model_version", "9"), grpc.StatusCode.NOT_FOUND, "version"),
    (lambda r: r.outputs.add(name="explain_features"), grpc.StatusCode.INVALID_ARGUMENT, "parameters.explain"),
    (lambda r: setattr(r.parameters["explain"], "string_param", "yes"), grpc.StatusCode.INVALID_ARGUMENT, "explain"),
])
def test_bad_requests_named_and_server_keeps_serving(stub, X, mutate, code, words):
    x = X[:4].astype(np.float32)
    req = pb.ModelInferRequest(model_name="cardio")
    req.inputs.add(name="X", datatype="FP32", shape=list(x.shape))
    req.raw_input_contents.append(x.tobytes())
    mutate(req)
    with pytest.raises(grpc.RpcError) as e:
        stub.ModelInfer(req)
    assert e.value.code() == code and words in e.value.details()
    ok = pb.ModelInferRequest(model_name="cardio")
    ok.inputs.add(name="X", datatype="FP32", shape=list(x.shape))
    ok.raw_input_contents.append(x.tobytes())
    assert stub.ModelInfer(ok).outputs[0].name == "score"


def test_stream_answers_a_bad_message_and_goes_on(stub, X, registry_dir):
    model = load_model(Registry(registry_dir).path("cardio", 1))
    x = X[:5].astype(np.float32)

    def req(shape):
        r = pb.ModelInferRequest(model_name="cardio", id=str(shape[1]))
        r.inputs.add(name="X", datatype="FP32", shape=shape)
        r.raw_input_contents.append(x.tobytes())
        return r

    answers = list(stub.ModelStreamInfer(iter([req([5, x.shape[1]]), req([5, 2]), req([5, x.shape[1]])])))
    assert [bool(a.error_message) for a in answers] == [False, True, False]
    assert "INVALID_ARGUMENT" in answers[1].error_message
    np.testing.assert_allclose(np.frombuffer(answers[2].infer_response.raw_output_contents[0], "<f8"), model.score(x), rtol=1e-6)


def test_undecodable_bytes_are_invalid_argument(server):
    with grpc.insecure_channel(server.target) as ch:
        with pytest.raises(grpc.RpcError) as e:
            ch.unary_unary("/inference.GRPCInferenceService/ModelInfer")(b"\x0a\xff\xff")
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "not a valid inference.ModelInferRequest" in e.value.details()
        answers = list(ch.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer",
                                        response_deserializer=pb.ModelStreamInferResponse.FromString)(iter([b"\x0a\xff\xff"])))
        assert len(answers) == 1 and "INVALID_ARGUMENT" in answers[0].error_message


def kserve_python() -> str:
    """An interpreter with KServe's client: this one, or OUTLIERD_KSERVE_PYTHON (kserve pins protobuf 6
    and grpcio-tools 1.81, so it lives in a virtualenv of its own: python -m venv v && v/bin/pip install kserve)."""
    import importlib.util
    import os

    if importlib.util.find_spec("kserve") is not None:
        return sys.executable
    python = os.environ.get("OUTLIERD_KSERVE_PYTHON")
    if not python:
        pytest.skip("KServe client not installed here and OUTLIERD_KSERVE_PYTHON not set (a python with `pip install kserve`)")
    return python


def test_kserve_client_conformance(loop_thread, registry_dir, X, rng, tmp_path):
    import os

    python = kserve_python()
    model = load_model(Registry(registry_dir).path("cardio", 1))
    data = records(X, rng)
    with serving(loop_thread, registry_dir, http_port=0, max_request_records=1 << 20) as running:
        env = {**os.environ, "KSERVE_REST_URL": f"http://127.0.0.1:{running.worker.http_port}"}
        out = run_client("kserve", running.target, "cardio", data, tmp_path, python=python, env=env)
    meta = assert_conformant(out, data, model, ("raw", "typed", "rest"))
    assert meta["live"] and meta["ready"] and meta["model_ready"] and meta["rest_ready"]
    assert meta["version-many-FP64"] == "1"


def test_token_guards_inference_but_not_liveness(loop_thread, registry_dir, X):
    with serving(loop_thread, registry_dir, auth_token="t0ken") as running, grpc.insecure_channel(running.target) as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        assert stub.ServerLive(pb.ServerLiveRequest()).live and stub.ServerReady(pb.ServerReadyRequest()).ready
        x = X[:2].astype(np.float32)
        req = pb.ModelInferRequest(model_name="cardio")
        req.inputs.add(name="X", datatype="FP32", shape=list(x.shape))
        req.raw_input_contents.append(x.tobytes())
        for metadata in ((), (("authorization", "Bearer wrong"),)):
            with pytest.raises(grpc.RpcError) as e:
                stub.ModelInfer(req, metadata=metadata)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as e:
            stub.ModelMetadata(pb.ModelMetadataRequest(name="cardio"))
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert stub.ModelInfer(req, metadata=(("authorization", "Bearer t0ken"),)).outputs[0].name == "score"
