"""The device policy on a machine without a GPU: auto picks the CPU and says so; cuda fails loudly."""

import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, dataset_path

import outlierd.core.backends
from outlierd.core import load_model
from outlierd.core.backends import DeviceError, resolve_device
from outlierd.cli import main

pytestmark = pytest.mark.skipif(outlierd.core.backends.cuda_available(), reason="these check the no-GPU behaviour")


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    reg = tmp_path_factory.mktemp("reg")
    assert main(["train", "--data", str(dataset_path("cardio")), "--registry", str(reg), "--model", "m",
                 "--label-column", "label", "--alias", "champion", "--quiet"]) == 0
    return reg


def test_auto_resolves_to_cpu_and_cuda_refuses():
    assert resolve_device("auto", "onnx") == "cpu"
    assert resolve_device("auto", "numba") == "cpu"
    with pytest.raises(DeviceError, match="no usable CUDA device"):
        resolve_device("cuda", "onnx")
    with pytest.raises(DeviceError, match="numba backend runs on the CPU"):
        resolve_device("cuda", "numba")


def test_loaded_model_reports_backend_and_device(registry):
    m = load_model(registry / "m" / "1")
    assert (m.backend, m.device) == ("numba", "cpu")
    with pytest.raises(DeviceError):
        load_model(registry / "m" / "1", device="cuda")


def test_score_cli_reports_device(registry, capsys):
    rc = main(["score", "--input", str(dataset_path("cardio")), "--registry", str(registry), "--model", "m", "--json"])
    out = capsys.readouterr().out
    assert rc == 0 and '"device": "cpu"' in out and '"backend": "numba"' in out
    rc = main(["score", "--input", str(dataset_path("cardio")), "--registry", str(registry), "--model", "m", "--device", "cuda"])
    err = capsys.readouterr().err
    assert rc == 2 and "numba backend runs on the CPU" in err and "Traceback" not in err


def test_serve_device_cuda_fails_at_start(registry):
    res = subprocess.run([sys.executable, "-m", "outlierd", "serve", "--registry", str(registry), "--model", "m",
                          "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0", "--device", "cuda"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr
    assert "outlierd: error:" in res.stderr and "no usable CUDA device" in res.stderr and "Traceback" not in res.stderr


def test_server_auto_scores_on_cpu_and_says_so(registry):
    import asyncio
    import threading

    from outlierd.server.app import start_worker
    from outlierd.server.client import ScorerClient
    from outlierd.server.settings import ServeSettings

    loop = asyncio.new_event_loop()
    t = threading.Thread(target=loop.run_forever, daemon=True)
    t.start()
    settings = ServeSettings(registry=registry, model="m", host="127.0.0.1", port=0, device="auto", gpu_min_rows=1)
    worker = asyncio.run_coroutine_threadsafe(start_worker(settings), loop).result(60)
    try:
        X = np.loadtxt(dataset_path("cardio"), delimiter=",", skiprows=1)[:300, :-1]
        with ScorerClient(f"127.0.0.1:{worker.port}") as c:
            resp = c.stub.Score(__import__("outlierd.server.client", fromlist=["request"]).request(X), timeout=30)
        assert resp.device == "cpu" and len(resp.scores) == 300
    finally:
        asyncio.run_coroutine_threadsafe(worker.stop(1), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
