"""Raw events through `outlierd consume` (issue 16 item 5): a model with a feature spec, events keyed
by entity on a 4-partition topic, two consumers in one group, one SIGKILLed mid-stream and
restarted, so partitions move twice: every result's score equals the model's score of the offline
replay's features (the entity state followed its partitions: rebuilt from the partition up to the
committed offset by the consumer that took it over)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
from brokers import Tansu
from conftest import run_cli
from test_consume_kafka import stop, wait_outputs

from outlierd.core.features import engine_for
from outlierd.core.model import load_model
from outlierd.core.registry import Registry
from outlierd.payments import payments

N = 12000
SPEC = "data/payments.features.json"


@pytest.fixture(scope="module")
def broker():
    b = Tansu()
    yield b
    b.stop()


def _consumer(broker: Tansu, registry, topic: str) -> subprocess.Popen:
    url = f"kafka://{broker.bootstrap}"
    cmd = [sys.executable, "-m", "outlierd", "consume", "--registry", str(registry), "--model", "pay", "--source", f"{url}/{topic}",
           "--group", "g-events", "--out", f"{url}/{topic}-out", "--dlq", f"{url}/{topic}-dlq", "--max-inflight", "300",
           "--threads", "1", "--no-capture"]
    return subprocess.Popen(cmd, env={**os.environ, "OUTLIERD_LOG_LEVEL": "WARNING"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)


def test_feature_state_follows_partitions_across_a_kill(broker, tmp_path):
    events = payments(N, 300, days=2, seed=5)
    pq.write_table(events.slice(0, 4000), tmp_path / "train.parquet")
    r = run_cli("train", "--events", str(tmp_path / "train.parquet"), "--features", SPEC, "--registry", str(tmp_path / "reg"),
                "--model", "pay", "--alias", "champion", "--quiet")
    assert r.returncode == 0, r.stderr
    artifact = Registry(tmp_path / "reg").path("pay", 1)
    offline = engine_for(artifact).replay(events)  # the whole stream in order, one state
    ref = load_model(artifact).score(offline.astype(np.float32))
    rows = events.to_pylist()
    msgs = [(row["card_id"].encode(), json.dumps({"id": row["event_id"], **row}).encode()) for row in rows]
    msgs.insert(N // 3, (b"c1", b'{"id": "bad", "card_id": "c1"}'))  # no time, no amount: a dead letter, state untouched
    topic = "pay"
    broker.create_topics([topic, f"{topic}-out", f"{topic}-dlq"])
    broker.produce(topic, msgs[:N // 2])
    a, b = _consumer(broker, tmp_path / "reg", topic), _consumer(broker, tmp_path / "reg", topic)
    procs = [a, b]
    try:
        wait_outputs(broker, f"{topic}-out", N // 4, 120, procs)
        feeder = threading.Thread(target=broker.produce, args=(topic, msgs[N // 2:]))
        feeder.start()
        time.sleep(1.0)
        a.send_signal(signal.SIGKILL)  # its partitions move to b, and back when it returns
        a.wait()
        feeder.join()
        procs = [_consumer(broker, tmp_path / "reg", topic), b]
        wait_outputs(broker, f"{topic}-out", N, 240, procs)
    finally:
        stop(*procs)
    outs = [json.loads(m.value()) for m in broker.read(f"{topic}-out", idle=3)]
    index = {row["event_id"]: i for i, row in enumerate(rows)}
    assert {o["id"] for o in outs} == set(index)  # every event scored
    got = np.array([o["score"] for o in outs])
    want = ref[[index[o["id"]] for o in outs]]
    bad = np.flatnonzero(~np.isclose(got, want, rtol=1e-5, atol=1e-7))
    print(f"raw events: {N} events, {len(outs)} results ({len(outs) - N} duplicates), {len(bad)} scores unlike the replay's")
    assert not len(bad), [(outs[i]["id"], got[i], want[i]) for i in bad[:5]]
    dlq = broker.read(f"{topic}-dlq", idle=2)
    assert len(dlq) == 1 and dict(dlq[0].headers())["error.reason"] == b"events"
