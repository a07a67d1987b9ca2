"""`outlierd consume` on a real MQTT broker (a Mosquitto of the test's own, persistent, so it can be
restarted): telemetry at QoS 1, the broker restarted mid-stream, every message the broker
acknowledged is scored, alerts land on the per-device alert topics. OUTLIERD_MQTT_RECORDS scales
the stream (the issue's figure is 100,000)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from brokers import Mosquitto
from test_consume_kafka import D, reference_scores, registry  # noqa: F401 - the fixture

M = int(os.environ.get("OUTLIERD_MQTT_RECORDS", "10000"))


class Collector:
    """A persistent-session subscriber at QoS 1 that keeps every payload per topic."""

    def __init__(self, port: int, filters: list[str], client_id: str) -> None:
        import paho.mqtt.client as mqtt

        self.got: dict[str, list[bytes]] = {}
        self.lock = threading.Lock()
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False, protocol=mqtt.MQTTv311)
        c.reconnect_delay_set(0.1, 2)
        c.on_connect = lambda cl, u, f, r, p: [cl.subscribe(t, qos=1) for t in filters]
        c.on_message = self._on_message
        c.connect("127.0.0.1", port, keepalive=10)
        c.loop_start()
        self.client = c

    def _on_message(self, client, userdata, msg) -> None:
        with self.lock:
            self.got.setdefault(msg.topic, []).append(msg.payload)

    def all(self, prefix: str) -> list[bytes]:
        with self.lock:
            return [p for t, ps in self.got.items() if t.startswith(prefix) for p in ps]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class Publisher:
    """QoS 1 telemetry; ``acked()``: the ids whose PUBACK came back."""

    def __init__(self, port: int) -> None:
        import paho.mqtt.client as mqtt

        self.infos: list = []
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="telemetry-pub", clean_session=False,
                        protocol=mqtt.MQTTv311)
        c.max_inflight_messages_set(1000)
        c.max_queued_messages_set(0)
        c.reconnect_delay_set(0.1, 2)
        c.connect("127.0.0.1", port, keepalive=10)
        c.loop_start()
        self.client = c

    def acked(self) -> set[str]:
        # NOTE: paho's private flag, set on PUBACK: a message queued while disconnected keeps rc
        # NO_CONN (is_published raises) though paho sends it after the reconnect
        return {rid for rid, info in self.infos if info._published}

    def publish(self, rid: str, device: str, row: np.ndarray) -> None:
        body = json.dumps({"id": rid, **{f"f{j}": float(v) for j, v in enumerate(row)}})
        self.infos.append((rid, self.client.publish(f"devices/{device}/telemetry", body, qos=1)))

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_mqtt_broker_restart_loses_nothing_acknowledged(tmp_path, registry):  # noqa: F811
    run_stream(tmp_path, registry, restart=True)


def run_stream(tmp_path, registry, restart: bool) -> None:  # noqa: F811
    broker = Mosquitto(tmp_path)
    url = f"mqtt://127.0.0.1:{broker.port}"
    collector = Collector(broker.port, ["scores", "alerts/#", "dlq"], "collector")
    cmd = [sys.executable, "-m", "outlierd", "consume", "--registry", str(registry), "--model", "m",
           "--source", f"{url}/devices/+/telemetry", "--out", f"{url}/scores", "--alerts", f"{url}/alerts",
           "--dlq", f"{url}/dlq", "--group", "scorer-1", "--qos", "1", "--threads", "1"]
    proc = subprocess.Popen(cmd, env={**os.environ, "OUTLIERD_LOG_LEVEL": "WARNING"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    pub = None
    try:
        pub = Publisher(broker.port)
        X = np.random.default_rng(4).standard_normal((M, D)).astype(np.float32)
        X[::40] *= 6
        # the consumer is subscribed once a probe comes back scored
        deadline = time.monotonic() + 60
        while not any(json.loads(p)["id"] == "probe" for p in collector.all("scores")):
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the consumer never scored the probe"
            pub.publish("probe", "d0", X[0])
            time.sleep(0.5)
        for i in range(M):
            pub.publish(f"m-{i}", f"d{i % 20}", X[i])
            if restart and i == M // 3:
                broker.restart()  # SIGTERM (it saves its database), then up again on the same port
        deadline = time.monotonic() + max(120, M / 400)  # the publisher's queue drains at some 1,000/s here
        while time.monotonic() < deadline:
            scored = {json.loads(p)["id"] for p in collector.all("scores")}
            acked = {r for r in pub.acked() if r.startswith("m-")}
            if len(acked) == M and acked <= scored:
                break
            time.sleep(1)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        collector.close()
        if pub is not None:
            pub.close()
        broker.stop()
    acked = {r for r in pub.acked() if r.startswith("m-")}
    outs = [json.loads(p) for p in collector.all("scores")]
    scored = {o["id"] for o in outs}
    missing = acked - scored
    print(f"{M} published, {len(acked)} acknowledged by the broker, {len(missing)} of those not scored, "
          f"{len(outs) - len(scored)} duplicate results")
    assert not missing, f"{len(missing)} acknowledged messages never scored, e.g. {sorted(missing)[:5]}"
    assert len(acked) >= M * 0.9, f"the broker acknowledged only {len(acked)} of {M}"
    ref = reference_scores(registry, X)
    for o in outs:
        if o["id"].startswith("m-"):
            assert o["score"] == pytest.approx(float(ref[int(o["id"][2:])]), rel=1e-6, abs=1e-9)
    alerts = collector.got
    flagged = {o["id"] for o in outs if o["anomalous"]}
    alert_ids = {json.loads(p)["id"]: t for t, ps in alerts.items() if t.startswith("alerts/") for p in ps}
    assert flagged and flagged == set(alert_ids)
    for rid, topic in alert_ids.items():  # per device: alerts/<device>
        if rid.startswith("m-"):
            assert topic == f"alerts/d{int(rid[2:]) % 20}"
