"""Hot reload under load: while 4 streams send continuously, the alias moves 10 times (once to a
corrupted artifact). No RPC fails, every response names a published and valid version, versions
never go backwards on a stream, the corrupted version never serves, each switch is seen within 2 s,
and every score equals ``load_model(that version).score`` on the same rows."""

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import pytest
from conftest import ROOT
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sklearn.ensemble import IsolationForest

from outlierd.core import load_model
from outlierd.core.registry import Registry
from outlierd.server.client import ScorerClient
from outlierd.training import export_sklearn

D = 8
ROWS_PER_MESSAGE = 64
N_VERSIONS = 11
CORRUPT = 6
MOVE_EVERY_S = 0.7


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_serving(target: str, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.time() + timeout
    with grpc.insecure_channel(target) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while time.time() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}: {proc.stderr.read().decode()}")
            try:
                if stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1).status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                time.sleep(0.2)
    raise TimeoutError("server did not become SERVING")


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    root = tmp_path_factory.mktemp("reg")
    reg = Registry(root)
    rng = np.random.default_rng(11)
    X = rng.normal(size=(2000, D))
    for seed in range(1, N_VERSIONS + 1):
        forest = IsolationForest(n_estimators=30, random_state=seed).fit(X)
        path = export_sklearn(forest, root / f"src{seed}", X_train=X)
        assert reg.publish("m", path) == seed
    reg.set_alias("m", "champion", 1)
    # corrupt a published version in place: a byte flipped on the shared volume
    arrays = reg.path("m", CORRUPT) / "arrays.npz"
    data = bytearray(arrays.read_bytes())
    data[len(data) // 3] ^= 0x5A
    arrays.write_bytes(bytes(data))
    return root


def test_hot_reload_under_load(registry):
    port = _free_port()
    env = dict(os.environ)
    proc = subprocess.Popen(
        [sys.executable, "-m", "outlierd", "serve", "--registry", str(registry), "--model", "m", "--host", "127.0.0.1",
         "--port", str(port), "--metrics-port", "0", "--max-delay-us", "200"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    target = f"127.0.0.1:{port}"
    try:
        _wait_serving(target, proc)
        rng = np.random.default_rng(5)
        pool = rng.normal(size=(50, ROWS_PER_MESSAGE, D)).astype(np.float32) * rng.uniform(0.5, 3, size=(50, 1, 1)).astype(np.float32)
        stop = threading.Event()
        results: list[list[tuple[float, int, int, np.ndarray]]] = [[] for _ in range(4)]
        errors: list[BaseException] = []

        def stream(k: int) -> None:
            def batches():
                i = 0
                while not stop.is_set() and i < 100_000:  # bounded
                    yield pool[(k * 7 + i) % len(pool)]
                    i += 1
                    time.sleep(0.002)

            try:
                with ScorerClient(target) as client:
                    for i, res in enumerate(client.score_stream(batches(), timeout=120)):
                        assert not res.error, res.error
                        results[k].append((time.time(), i, res.version, res.scores))
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=stream, args=(k,), daemon=True) for k in range(4)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        reg = Registry(registry)
        moves: dict[int, float] = {}
        for version in range(2, N_VERSIONS + 1):
            reg.set_alias("m", "champion", version)
            moves[version] = time.time()
            time.sleep(MOVE_EVERY_S)
        time.sleep(1.0)
        stop.set()
        for t in threads:
            t.join(timeout=30)
        assert not errors, errors
        assert all(len(r) > 50 for r in results), [len(r) for r in results]

        valid = set(range(1, N_VERSIONS + 1)) - {CORRUPT}
        models = {v: load_model(reg.path("m", v)) for v in valid}
        first_seen: dict[int, float] = {}
        for k, rows in enumerate(results):
            versions = [v for _, _, v, _ in rows]
            assert set(versions) <= valid, set(versions) - valid
            assert all(a <= b for a, b in zip(versions, versions[1:])), f"stream {k} went backwards"
            for t_recv, i, v, scores in rows:
                first_seen[v] = min(first_seen.get(v, t_recv), t_recv)
                expected = models[v].score(pool[(k * 7 + i) % len(pool)])
                np.testing.assert_allclose(scores, expected, atol=1e-6)
        assert CORRUPT not in first_seen
        for version in valid - {1}:
            assert version in first_seen, f"version {version} never served"
            assert first_seen[version] - moves[version] <= 2.0, (version, first_seen[version] - moves[version])
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            _, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
    log = err.decode()
    assert proc.returncode == 0, log
    assert f"reload refused model=m version={CORRUPT}" in log
