"""An alias moved to a broken version (issue 14 items 2 and 17).

Before: ``outlierd registry alias`` moved an alias to a version that fails verification (exit 0);
running workers refused it, but any worker that (re)started then died every ~1.4 s, and a fresh
``serve`` exited 2. Now the CLI verifies first (``--force`` overrides, audited), and a worker that
starts while its alias points at a broken version serves the last good version the audit log
knows, says so (log, ``outlierd_model_reloads_total{result="fallback"}``) and keeps watching.
Registry problems seen by the watcher are counted and their log lines rate-limited.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import subprocess
import sys
import time

import grpc
import numpy as np
import pytest
from conftest import run_cli
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry

from outlierd.core import load_model
from outlierd.core.registry import Registry
from outlierd.monitoring.metrics import ServiceMetrics
from outlierd.server.client import ScorerClient
from outlierd.server.reload import ModelSlot
from outlierd.training import export_sklearn

D = 5


@pytest.fixture
def registry(tmp_path):
    """Versions 1, 2 (good), 3 (corrupted on disk); champion -> 1, then 2."""
    from sklearn.ensemble import IsolationForest

    reg = Registry(tmp_path / "reg")
    X = np.random.default_rng(5).normal(size=(1000, D))
    for seed in (1, 2, 3):
        reg.publish("m", export_sklearn(IsolationForest(n_estimators=20, random_state=seed).fit(X), tmp_path / f"a{seed}",
                                        X_train=X))
    reg.set_alias("m", "champion", 1)
    reg.set_alias("m", "champion", 2)
    arrays = reg.path("m", 3) / "arrays.npz"
    data = bytearray(arrays.read_bytes())
    data[len(data) // 3] ^= 0x5A
    arrays.write_bytes(bytes(data))
    return reg


def test_cli_refuses_an_alias_to_a_version_that_fails_verification(registry):
    r = run_cli("registry", "alias", "--registry", str(registry.root), "--model", "m", "champion", "3")
    assert r.returncode == 2
    assert r.stderr.startswith("outlierd: error: version 3 of 'm' fails verification, so alias 'champion' stays at version 2")
    assert "--force" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert registry.aliases("m")["champion"] == 2
    # a good version moves as before
    r = run_cli("registry", "alias", "--registry", str(registry.root), "--model", "m", "challenger", "1")
    assert r.returncode == 0 and r.stdout.strip() == "m: challenger -> 1"


def test_force_moves_it_and_the_audit_says_so(registry):
    r = run_cli("registry", "alias", "--registry", str(registry.root), "--model", "m", "champion", "3", "--force")
    assert r.returncode == 0 and r.stdout.strip() == "m: champion -> 3 (was 2)"
    assert registry.aliases("m")["champion"] == 3
    last = registry.audit("m")[-1]
    assert (last["action"], last["alias"], last["version"], last["previous"], last["forced"]) == ("alias", "champion", 3, 2, True)
    assert "checksum" in last["verify_error"] or "sha256" in last["verify_error"], last["verify_error"]


def test_last_good_walks_the_alias_history(registry):
    registry.set_alias("m", "champion", 3, verify=True, force=True)
    registry.set_alias("m", "challenger", 1)
    assert list(registry.last_good("m", "champion", refused=(3,))) == [2, 1]
    assert list(registry.last_good("m", "challenger")) == [1]


def test_a_worker_starting_on_a_broken_alias_serves_the_last_good_version(registry, caplog):
    registry.set_alias("m", "champion", 3, verify=True, force=True)
    metrics = ServiceMetrics(registry=CollectorRegistry())
    slot = ModelSlot(registry, "m", "champion", metrics)
    with caplog.at_level(logging.ERROR, logger="outlierd.reload"):
        handle = slot.load_initial()
    assert (handle.version, slot.fallback) == (2, True)
    assert any("serving the last good version=2" in r.getMessage() and "version=3" in r.getMessage() for r in caplog.records)
    value = metrics.registry.get_sample_value
    assert value("outlierd_model_reloads_total", {"model": "m", "result": "fallback"}) == 1
    assert value("outlierd_model_reloads_total", {"model": "m", "result": "refused"}) == 1

    async def watch():
        assert await slot.check() is False  # the broken version is not retried while the alias stays
        registry.set_alias("m", "champion", 1)
        return await slot.check()

    assert asyncio.run(watch()) is True  # and it keeps watching: the alias moved, the worker follows
    assert (slot.current.version, slot.fallback) == (1, False)


def test_no_good_version_at_all_still_fails_clearly(tmp_path):
    from sklearn.ensemble import IsolationForest

    reg = Registry(tmp_path / "reg")
    X = np.random.default_rng(1).normal(size=(500, D))
    reg.publish("m", export_sklearn(IsolationForest(n_estimators=5).fit(X), tmp_path / "a", X_train=X), aliases=("champion",))
    (reg.path("m", 1) / "arrays.npz").write_bytes(b"garbage")
    with pytest.raises(Exception) as e:
        ModelSlot(reg, "m", "champion").load_initial()
    assert "arrays.npz" in str(e.value)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_end_to_end_on_a_broken_alias(registry, tmp_path):
    # a fresh `outlierd serve` (as a restarted worker would) answers with version 2 instead of exiting
    assert run_cli("registry", "alias", "--registry", str(registry.root), "--model", "m", "champion", "3", "--force").returncode == 0
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTLIERD_")}
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "outlierd", "serve", "--registry", str(registry.root), "--model", "m",
                             "--host", "127.0.0.1", "--port", str(port), "--metrics-port", "0", "--no-capture"],
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 90
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            while True:
                assert proc.poll() is None, (tmp_path / "serve.log").read_text()
                try:
                    if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == health_pb2.HealthCheckResponse.SERVING:
                        break
                except grpc.RpcError:
                    pass
                assert time.monotonic() < deadline, "not SERVING"
                time.sleep(0.2)
        X = np.random.default_rng(2).normal(size=(7, D)).astype(np.float32)
        with ScorerClient(f"127.0.0.1:{port}") as client:
            got = client.score(X)
        assert got.version == 2
        np.testing.assert_allclose(got.scores, load_model(registry.path("m", 2)).score(X), atol=1e-9)
        text = (tmp_path / "serve.log").read_text()
        assert "serving the last good version=2" in text
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        log.close()


def test_registry_problems_are_counted_and_logged_once_a_minute(registry, caplog):
    metrics = ServiceMetrics(registry=CollectorRegistry())
    slot = ModelSlot(registry, "m", "champion", metrics)
    slot.load_initial()
    (registry.root / "m" / "aliases.json").write_text("{not json")

    async def watch(n):
        return [await slot.check() for _ in range(n)]

    with caplog.at_level(logging.WARNING, logger="outlierd.reload"):
        assert asyncio.run(watch(12)) == [False] * 12
    lines = [r.getMessage() for r in caplog.records if "alias check failed" in r.getMessage()]
    assert len(lines) == 1 and "aliases.json" in lines[0]
    assert metrics.registry.get_sample_value("outlierd_model_reloads_total", {"model": "m", "result": "registry_error"}) == 12
    assert slot.current.version == 2  # and it kept serving
