"""`outlierd consume` on a real Kafka-compatible broker (Tansu): consumer processes in one group,
one SIGKILLed mid-stream and restarted; nothing lost, scores equal the model's own, malformed
records in the dead-letter topic with their error. OUTLIERD_CONSUME_RECORDS scales the stream (the
issue's figure is 1,000,000; the default keeps the test short on two shared cores)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from brokers import Tansu

N = int(os.environ.get("OUTLIERD_CONSUME_RECORDS", "20000"))
D = 4
INFLIGHT = 500


@pytest.fixture(scope="module")
def broker():
    b = Tansu()
    yield b
    b.stop()


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    from sklearn.ensemble import IsolationForest

    from outlierd.core.registry import Registry
    from outlierd.training.export import export_sklearn

    root = tmp_path_factory.mktemp("consume")
    X = np.random.default_rng(0).standard_normal((500, D))
    Registry(root / "reg").publish("m", export_sklearn(IsolationForest(n_estimators=10, random_state=0).fit(X), root / "a",
                                                       X_train=X, feature_names=[f"f{j}" for j in range(D)]),
                                    aliases=("champion",))
    return root / "reg"


def records(n: int, seed: int = 1) -> np.ndarray:
    X = np.random.default_rng(seed).standard_normal((n, D)).astype(np.float32)
    X[::50] *= 6  # some anomalies, so alerts flow
    return X


def messages(X: np.ndarray, prefix: str):
    for i, row in enumerate(X):
        body = {"id": f"{prefix}{i}", **{f"f{j}": float(v) for j, v in enumerate(row)}}
        yield f"k{i % 257}".encode(), json.dumps(body).encode()


def consumer(broker: Tansu, registry: Path, topic: str, group: str, *extra: str) -> subprocess.Popen:
    url = f"kafka://{broker.bootstrap}"
    cmd = [sys.executable, "-m", "outlierd", "consume", "--registry", str(registry), "--model", "m",
           "--source", f"{url}/{topic}", "--group", group, "--out", f"{url}/{topic}-out",
           "--alerts", f"{url}/{topic}-alerts", "--dlq", f"{url}/{topic}-dlq", "--max-inflight", str(INFLIGHT),
           "--threads", "1", *extra]
    env = {**os.environ, "OUTLIERD_LOG_LEVEL": "WARNING"}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def wait_outputs(broker: Tansu, topic: str, want: int, timeout: float, procs=()) -> list:
    deadline = time.monotonic() + timeout
    got: list = []
    while time.monotonic() < deadline:
        for p in procs:
            assert p.poll() is None, f"consumer exited {p.returncode}: {p.stderr.read().decode()[-2000:]}"
        got = broker.read(topic, until=want, timeout=20, idle=2)
        if len(got) >= want:
            return got
        time.sleep(1)
    return got


def stop(*procs: subprocess.Popen) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def reference_scores(registry: Path, X: np.ndarray) -> np.ndarray:
    from outlierd.core.registry import Registry

    return Registry(registry).load("m", 1).score(X)


def check_scores(outs: list, registry: Path, X: np.ndarray, prefix: str) -> dict[str, int]:
    ref = reference_scores(registry, X)
    counts: Counter = Counter()
    for m in outs:
        body = json.loads(m.value())
        i = int(body["id"][len(prefix):])
        counts[body["id"]] += 1
        assert body["model"] == "m" and body["version"] == 1 and body["threshold_version"] == 0
        assert body["score"] == pytest.approx(float(ref[i]), rel=1e-6, abs=1e-9), body
    return counts


def kill_and_restart(broker, registry, topic, group, X, prefix, extra=()):
    """Half the stream in, two consumers; once a quarter of the results are out, the other half flows
    in and one consumer is SIGKILLed a second later (mid-stream whatever the speed), then restarted."""
    msgs = list(messages(X, prefix))
    broker.produce(topic, msgs[:N // 2])
    a = consumer(broker, registry, topic, group, "--instance", "a", *extra)
    b = consumer(broker, registry, topic, group, "--instance", "b", *extra)
    procs = [a, b]
    try:
        wait_outputs(broker, f"{topic}-out", N // 4, max(120, N / 2000), procs)
        # the rest of the stream flows in while the consumers are busy, and one dies mid-batch
        feeder = threading.Thread(target=broker.produce, args=(topic, msgs[N // 2:]))
        feeder.start()
        time.sleep(1.0)
        a.send_signal(signal.SIGKILL)
        a.wait()
        feeder.join()
        a2 = consumer(broker, registry, topic, group, "--instance", "a", *extra)
        procs = [a2, b]
        return procs
    except BaseException:
        stop(*procs)
        raise


def test_at_least_once_survives_sigkill(broker, registry):
    topic = "alo"
    broker.create_topics([topic, f"{topic}-out", f"{topic}-alerts", f"{topic}-dlq"])
    X = records(N)
    procs = kill_and_restart(broker, registry, topic, "g-alo", X, "t-")
    try:
        outs = wait_outputs(broker, f"{topic}-out", N, max(240, N / 500), procs)  # 1M: 2,000 s at most
    finally:
        stop(*procs)
    outs = broker.read(f"{topic}-out", idle=3)
    counts = check_scores(outs, registry, X, "t-")
    assert set(counts) == {f"t-{i}" for i in range(N)}  # nothing lost
    dups = sum(c - 1 for c in counts.values())
    print(f"at-least-once: {N} records, {len(outs)} results, {dups} duplicates (one batch: {INFLIGHT})")
    assert dups <= INFLIGHT, f"{dups} duplicates; at most one batch ({INFLIGHT}) was in flight at the kill"
    alerts = broker.read(f"{topic}-alerts", idle=2)
    assert alerts and all(json.loads(m.value())["anomalous"] and json.loads(m.value())["explanation"] for m in alerts)
    # keyed like the input: an entity's results stay in one partition
    assert all(m.key().startswith(b"k") for m in outs[:100])


def test_exactly_once_survives_sigkill(broker, registry):
    topic = "eos"
    broker.create_topics([topic, f"{topic}-out", f"{topic}-alerts", f"{topic}-dlq"])
    X = records(N, seed=2)
    procs = kill_and_restart(broker, registry, topic, "g-eos", X, "e-", ("--guarantee", "exactly-once"))
    try:
        wait_outputs(broker, f"{topic}-out", N, 240, procs)
        time.sleep(2)
    finally:
        stop(*procs)
    outs = broker.read(f"{topic}-out", committed=True, idle=3)
    raw = broker.read(f"{topic}-out", idle=3)
    print(f"exactly-once: {N} records; read_committed sees {len(outs)} results, read_uncommitted {len(raw)} "
          "(the difference: the killed consumer's aborted transaction)")
    counts = check_scores(outs, registry, X, "e-")
    assert set(counts) == {f"e-{i}" for i in range(N)}
    assert max(counts.values()) == 1, f"{sum(c - 1 for c in counts.values())} duplicates seen by read_committed"


def test_dead_letters_carry_their_error(broker, registry):
    topic = "dlq"
    broker.create_topics([topic, f"{topic}-out", f"{topic}-alerts", f"{topic}-dlq"])
    n_good, n_bad = 5000, 1000
    X = records(n_good, seed=3)
    good = list(messages(X, "g-"))
    kinds = [b"{not json", b'[1, 2]', b'{"id": "x", "f0": 1.0}', b'{"id": "x", "f0": "a", "f1": 1, "f2": 1, "f3": 1}',
             b'{"id": "x", "model": "other", "f0": 1, "f1": 1, "f2": 1, "f3": 1}']
    mixed = []
    for i, item in enumerate(good):
        mixed.append(item)
        if i % 5 == 0:
            mixed.append((b"bad", kinds[(i // 5) % len(kinds)]))
    assert sum(1 for k, _ in mixed if k == b"bad") == n_bad
    broker.produce(topic, mixed)
    p = consumer(broker, registry, topic, "g-dlq")
    try:
        wait_outputs(broker, f"{topic}-out", n_good, 120, [p])
        wait_outputs(broker, f"{topic}-dlq", n_bad, 60, [p])
    finally:
        stop(p)
    dead = broker.read(f"{topic}-dlq", idle=3)
    counts = check_scores(broker.read(f"{topic}-out", idle=2), registry, X, "g-")
    assert set(counts) == {f"g-{i}" for i in range(n_good)}
    assert len(dead) == n_bad
    reasons = Counter(dict(m.headers())["error.reason"] for m in dead)
    assert reasons == {b"decode": 400, b"n_features": 200, b"type": 200, b"unknown_model": 200}
    for m in dead:
        h = dict(m.headers())
        assert h["error"] and m.value() in kinds and h["source.topic"] == topic.encode()
