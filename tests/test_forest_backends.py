"""Isolation Forest on the array backends: the ONNX graph (ONNX Runtime) and the torch program score
like the Numba kernel (within 1e-9; both sum path lengths in float64), on CPU here and on CUDA where
a GPU is present."""

import numpy as np
import pytest
from conftest import load_csv
from sklearn.ensemble import IsolationForest

import outlierd.core.backends
from outlierd.core import load_model
from outlierd.core.backends import DeviceError
from outlierd.core.iforest import Forest
from outlierd.training import export_sklearn

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

ATOL = 1e-9  # float64 sums of the same float64 leaf values: only the summation order differs
BACKENDS = ["onnx", "torch"]


def _backend(name):
    if name == "torch":
        pytest.importorskip("torch")
    return name


def _export(tmp_path, X, **params):
    forest = IsolationForest(**params).fit(X)
    return export_sklearn(forest, tmp_path / "m", X_train=X)


def _records(rng, X, n):
    d = X.shape[1]
    Xt = np.concatenate([X[rng.integers(0, len(X), size=n // 2)], rng.normal(size=(n - n // 2, d)) * 50])
    if n:
        Xt[rng.random(n) < 0.1, rng.integers(0, d)] = np.nan  # NaN rows: imputed with the medians
        Xt[rng.random(n) < 0.02, 0] = np.inf
    return Xt


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "n_train,d,params",
    [
        (300, 1, {}),
        (1000, 5, {}),
        (2000, 32, {"n_estimators": 60}),
        (400, 300, {"n_estimators": 10}),  # > 256 features: uint16 feature indices
        (100, 4, {"max_samples": 2, "n_estimators": 7}),  # depth-1 trees
        (1500, 6, {"max_samples": 1.0, "n_estimators": 10}),  # deep trees
        (600, 3, {"bootstrap": True, "max_features": 0.7}),
    ],
)
def test_scores_equal_numba(tmp_path, rng, backend, n_train, d, params):
    X = rng.normal(size=(n_train, d)) * rng.uniform(0.1, 100, size=d) + rng.normal(size=d) * 10
    path = _export(tmp_path, X, random_state=int(rng.integers(1 << 31)), **params)
    ref = load_model(path)
    model = load_model(path, backend=_backend(backend))
    # the default device is auto: the GPU where this backend can use one, else the CPU
    auto = "cuda" if outlierd.core.backends.cuda_available(backend) else "cpu"
    assert model.backend == backend and model.device == auto
    assert load_model(path, backend=backend, device="cpu").device == "cpu"
    for n in (0, 1, 2, 63, 1500):
        Xt = _records(rng, X, n)
        got = model.score(Xt)
        assert got.shape == (n,) and got.dtype == np.float64
        np.testing.assert_allclose(got, ref.score(Xt), rtol=0, atol=ATOL)
        np.testing.assert_allclose(model.score(Xt.astype(np.float32)), ref.score(Xt.astype(np.float32)), rtol=0, atol=ATOL)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["cardio", "satellite", "mammography", "shuttle"])
def test_datasets_equal_numba(tmp_path, backend, name):
    X, _ = load_csv(name)
    path = _export(tmp_path, X, random_state=0)
    ref, model = load_model(path), load_model(path, backend=_backend(backend))
    # the default device is auto: on a machine with a GPU this backend uses, the GPU
    assert (model.backend, model.device) == (backend, "cuda" if outlierd.core.backends.cuda_available(backend) else "cpu")
    np.testing.assert_allclose(model.score(X), ref.score(X), rtol=0, atol=ATOL)
    np.testing.assert_array_equal(model.predict(X), ref.predict(X))


@pytest.mark.parametrize("backend", BACKENDS)
def test_chunked_rows_equal_unchunked(tmp_path, rng, backend, monkeypatch):
    # large batches run in row chunks: force tiny chunks and compare
    X = rng.normal(size=(500, 4))
    path = _export(tmp_path, X, n_estimators=15, random_state=0)
    Xt = rng.normal(size=(1001, 4)) * 2
    whole = load_model(path, backend=_backend(backend)).score(Xt)
    mod = __import__(f"outlierd.core.forest_{backend}", fromlist=["CHUNK_ROWS"])
    monkeypatch.setattr(mod, "CHUNK_ROWS", 64)
    chunked = load_model(path, backend=backend)
    np.testing.assert_array_equal(chunked.score(Xt), whole)
    np.testing.assert_allclose(whole, load_model(path).score(Xt), rtol=0, atol=ATOL)


def test_onnx_graph_uses_standard_ops_only(tmp_path, rng):
    from outlierd.core.forest_onnx import forest_to_onnx

    X = rng.normal(size=(800, 7))
    path = _export(tmp_path, X, n_estimators=25, random_state=0)
    with np.load(path / "arrays.npz") as z:
        forest = Forest.from_arrays(dict(z), 7)
    model = forest_to_onnx(forest, 7)
    onnx.checker.check_model(model, full_check=True)
    ops = {(n.domain, n.op_type) for n in model.graph.node}
    assert all(domain in ("", "ai.onnx") for domain, _ in ops), ops
    assert not any("Tree" in op for _, op in ops)
    assert all(o.domain in ("", "ai.onnx") for o in model.opset_import)
    assert [i.name for i in model.graph.input] == ["X"] and [o.name for o in model.graph.output] == ["score"]
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and dims[1].dim_value == 7  # dynamic batch, fixed features
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    # the levels are unrolled: one GatherElements per level below the root
    assert sum(n.op_type == "GatherElements" for n in model.graph.node) == forest.depth - 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_cuda_without_gpu_is_refused(tmp_path, rng, backend):
    if outlierd.core.backends.cuda_available():
        pytest.skip("a CUDA device is present")
    X = rng.normal(size=(300, 3))
    path = _export(tmp_path, X, n_estimators=5, random_state=0)
    with pytest.raises(DeviceError, match="(?i)cuda"):
        load_model(path, backend=_backend(backend), device="cuda")
    assert load_model(path, backend=backend, device="auto").device == "cpu"


def test_torch_missing_is_a_clear_error(tmp_path, rng, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_torch(name, *a, **kw):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("No module named 'torch'")
        return real_import(name, *a, **kw)

    X = rng.normal(size=(300, 3))
    path = _export(tmp_path, X, n_estimators=5, random_state=0)
    monkeypatch.setattr(builtins, "__import__", no_torch)
    with pytest.raises(ValueError, match=r"torch backend needs the torch extra"):
        load_model(path, backend="torch", device="cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not outlierd.core.backends.cuda_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", BACKENDS)
def test_cuda_equals_cpu(tmp_path, rng, backend):
    if backend == "torch":
        torch = pytest.importorskip("torch")
        if not torch.cuda.is_available():
            pytest.skip("torch has no CUDA here")
    else:
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            pytest.skip("onnxruntime has no CUDAExecutionProvider here")
    X = rng.normal(size=(3000, 16)) * rng.uniform(0.1, 10, size=16)
    path = _export(tmp_path, X, n_estimators=100, random_state=0)
    ref = load_model(path)
    gpu = load_model(path, backend=backend, device="cuda")
    assert (gpu.backend, gpu.device) == (backend, "cuda")
    for n in (1, 1000, 70_000):  # 70k rows: more than one chunk
        Xt = _records(rng, X, n)
        np.testing.assert_allclose(gpu.score(Xt), ref.score(Xt), rtol=0, atol=ATOL)
