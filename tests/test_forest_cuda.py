"""The cuda backend (core.forest_cuda: a custom CUDA kernel for the Isolation Forest walk).

- Everywhere: the kernel under Numba's CUDA simulator, in a subprocess (the simulator is chosen by
  NUMBA_ENABLE_CUDASIM=1 before numba.cuda is first imported): scores equal the Numba CPU kernel's
  within 1e-9 on small real models, batches split over chunks and streams, batch sizes that are not
  multiples of the block, every ILP variant, the two-kernel path, the reject policy.
- Without a GPU: the backend refuses --device cuda with a clear error and `auto` scores on the CPU.
- With a GPU (marker gpu): the real device against the CPU kernel at scale.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT
from sklearn.ensemble import IsolationForest

import outlierd.core.backends
from outlierd.core import load_model
from outlierd.core.backends import DeviceError, numba_cuda_available, resolve_device
from outlierd.core.iforest import Forest
from outlierd.training import export_sklearn

ATOL = 1e-9
MAX = np.iinfo(np.int64).max


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    out = tmp_path_factory.mktemp("cudasim")
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "1", "PYTHONHASHSEED": "0"}
    res = subprocess.run([sys.executable, str(ROOT / "tests" / "cudasim_cases.py"), str(out)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_sim_runs_the_backend_as_users_load_it(sim):
    assert sim["simulated"] is True
    assert sim["loaded"] == ["cuda", "cuda"]  # load_model(backend="cuda", device="cuda")
    assert sim["model_f64"] <= ATOL and sim["model_f32"] <= ATOL  # NaN / +-inf rows imputed as on the CPU
    assert sim["model_empty"] == [0]
    assert sim["explain"][0] <= ATOL and sim["explain"][1] is True  # scores from the GPU, attributions from Numba


def test_sim_chunks_streams_blocks_and_ilp_equal_the_cpu_kernel(sim):
    cases = sim["cases"]
    assert len(cases) == 5
    for name, c in cases.items():
        assert c["diff"] <= ATOL, name
        assert c["reuse"] <= ATOL, name
    assert cases["one_chunk_block128_ilp4"]["f32"] <= ATOL
    assert cases["chunks64_streams2_block32_ilp4"]["block"] == 32
    assert cases["global_prep_chunks128"]["global_prep"] is True  # records too wide for shared memory
    assert not cases["one_chunk_block128_ilp4"]["global_prep"]
    assert sim["device_resident"][0] <= ATOL and sim["device_resident"][1] is True


def test_sim_reject_names_the_first_bad_record_like_the_cpu(sim):
    msgs = sim["reject"]
    assert msgs["cpu"] is not None and "record 201 " in msgs["cpu"]
    for name in ("one_chunk", "chunks64", "global_prep"):
        assert msgs[name] == msgs["cpu"], name
    assert sim["reject_clean"] <= ATOL


def _model(tmp_path, rng, n=400, d=4, trees=5):
    X = rng.normal(size=(n, d))
    return X, export_sklearn(IsolationForest(n_estimators=trees, random_state=0).fit(X), tmp_path / "m", X_train=X)


@pytest.mark.skipif(numba_cuda_available(), reason="checks the behaviour without a GPU")
def test_without_gpu_cuda_refuses_and_auto_scores_on_cpu(tmp_path, rng):
    with pytest.raises(DeviceError, match=r"no usable CUDA device for the cuda backend.*'cuda' extra"):
        resolve_device("cuda", "cuda")
    assert resolve_device("auto", "cuda") == "cpu" and resolve_device("cpu", "cuda") == "cpu"
    X, path = _model(tmp_path, rng)
    with pytest.raises(DeviceError, match="numba.cuda.is_available"):
        load_model(path, backend="cuda", device="cuda")
    auto = load_model(path, backend="cuda")  # device auto: the Numba kernel, and the model says so
    assert (auto.backend, auto.device) == ("numba", "cpu")
    np.testing.assert_array_equal(auto.score(X), load_model(path).score(X))
    from outlierd.core.forest_cuda import CudaForest
    from outlierd.core.preprocess import Preprocessing

    forest = Forest.from_arrays(dict(np.load(path / "arrays.npz")), 4)
    with pytest.raises(DeviceError, match=r"numba.cuda.is_available\(\) is False.*numba-cuda"):
        CudaForest(forest, Preprocessing.identity(4))


@pytest.mark.skipif(numba_cuda_available(), reason="checks the behaviour without a GPU")
def test_cli_backend_cuda_device_cuda_fails_cleanly(tmp_path, rng, capsys):
    from outlierd.cli import main

    X, path = _model(tmp_path, rng)
    reg = tmp_path / "reg"
    csv = tmp_path / "x.csv"
    np.savetxt(csv, X, delimiter=",", header="a,b,c,d", comments="")
    assert main(["train", "--data", str(csv), "--registry", str(reg), "--model", "m", "--alias", "champion", "--quiet"]) == 0
    rc = main(["score", "--input", str(csv), "--registry", str(reg), "--model", "m", "--backend", "cuda", "--device", "cuda"])
    err = capsys.readouterr().err
    assert rc == 2 and "no usable CUDA device for the cuda backend" in err and "Traceback" not in err
    rc = main(["score", "--input", str(csv), "--registry", str(reg), "--model", "m", "--backend", "cuda", "--json"])
    out = capsys.readouterr().out
    assert rc == 0 and '"device": "cpu"' in out


def test_cuda_backend_is_for_the_forest_only(tmp_path, rng):
    from outlierd.core.errors import InvalidInputError
    from outlierd.training.train import train

    csv = tmp_path / "x.csv"
    np.savetxt(csv, rng.normal(size=(300, 3)), delimiter=",", header="a,b,c", comments="")
    res = train(csv, tmp_path / "reg", "h", detector="hbos", quiet=True)
    with pytest.raises(InvalidInputError, match="has no 'cuda' backend"):
        load_model(res.path, backend="cuda")


# ---------------------------------------------------------------------------------- on a real GPU

gpu = pytest.mark.skipif(not numba_cuda_available(), reason="needs a CUDA device for numba (numba-cuda)")


@pytest.mark.gpu
@gpu
def test_gpu_equals_cpu_at_scale(tmp_path, rng):
    from numba import cuda

    d = 32
    X = rng.normal(size=(20_000, d)).astype(np.float32)
    path = export_sklearn(IsolationForest(n_estimators=100, max_samples=256, random_state=0).fit(X), tmp_path / "m", X_train=X)
    ref, dev = load_model(path), load_model(path, backend="cuda", device="cuda")
    assert (dev.backend, dev.device) == ("cuda", "cuda") and outlierd.core.backends.cuda_available("cuda")
    for n in (1, 127, 4097, 600_001):  # 600,001: three chunks over the streams, the last one ragged
        Xt = rng.normal(size=(n, d)) * 3
        Xt[rng.random(n) < 0.01, 5] = np.nan
        Xt[rng.random(n) < 0.01, 7] = np.inf
        np.testing.assert_allclose(dev.score(Xt), ref.score(Xt), rtol=0, atol=ATOL)
        X32 = Xt.astype(np.float32)
        np.testing.assert_allclose(dev.score(X32), ref.score(X32), rtol=0, atol=ATOL)
    cf = dev._scorer.cuda_forest
    Xt = rng.normal(size=(100_000, d)).astype(np.float32)
    d_out, d_bad = cf.score_device(cuda.to_device(Xt))
    cuda.synchronize()
    np.testing.assert_allclose(d_out.copy_to_host(), ref.score(Xt), rtol=0, atol=ATOL)
    assert int(d_bad.copy_to_host()[0]) == MAX


@pytest.mark.gpu
@gpu
def test_gpu_reject_and_wide_records(tmp_path, rng):
    from outlierd.core.errors import InvalidInputError
    from outlierd.core.forest_cuda import CudaForest
    from outlierd.core.iforest import numba_scorer
    from outlierd.core.preprocess import Preprocessing

    d = 600  # (d + 1) * 4 bytes per row: 48 KB hold fewer than a warp's rows -> the two-kernel path
    X = rng.normal(size=(3000, d))
    path = export_sklearn(IsolationForest(n_estimators=20, random_state=0).fit(X), tmp_path / "m", X_train=X)
    forest = Forest.from_arrays(dict(np.load(path / "arrays.npz")), d)
    prep = Preprocessing(np.median(X, axis=0), rng.normal(size=d), 1 / rng.uniform(0.5, 2, size=d), "reject")
    cf = CudaForest(forest, prep, chunk_rows=1000)
    assert cf.global_prep
    Xt = rng.normal(size=(5000, d))
    np.testing.assert_allclose(cf.score(Xt), numba_scorer(forest, prep)(Xt), rtol=0, atol=ATOL)
    Xt[3210, 17] = np.nan
    Xt[4000, 1] = -np.inf
    with pytest.raises(InvalidInputError, match="record 3210 "):
        cf.score(Xt)


def test_sim_bench_gpu_suite_runs_and_reports(tmp_path):
    """The bench's gpu suite (outlierd bench --suite gpu) on the code path a GPU machine runs, under the
    simulator with a small forest and tiny sizes: every section measured, scores checked, the report written."""
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "1"}
    res = subprocess.run([sys.executable, str(ROOT / "tests" / "cudasim_bench.py"), str(tmp_path)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    g = json.loads(res.stdout.strip().splitlines()[-1])
    assert g["available"] and g["simulated"] and "cuda" in g["backends"] and g["max_abs_diff_vs_cpu"]["cuda"] <= ATOL
    assert [p["batch"] for p in g["points"]] == [1, 200] and all(p["cuda"] > 0 and p["cpu"] > 0 for p in g["points"])
    c = g["cuda"]
    assert c["device_resident"]["max_abs_diff_vs_cpu"] <= ATOL and c["device_resident"]["records_per_s"] > 0
    assert [p["rows"] for p in c["device_resident"]["by_size"]] == [64, 200]
    assert c["end_to_end"]["best"]["records_per_s"] == max(s["records_per_s"] for s in c["end_to_end"]["sweep"])
    assert c["targets"]["device_resident_met"] is False  # a simulator is not a GPU
    summary = (tmp_path / "report" / "summary.txt").read_text()
    assert "SIMULATED" in summary and "device-resident" in summary and "end to end from host memory" in summary
    assert (tmp_path / "report" / "gpu.png").stat().st_size > 10_000
