"""Retraining from Alertmanager: monitoring.alerts and ``outlierd retrain-policy --listen``, over real
HTTP on 127.0.0.1. A firing drift alert (webhook payload version 4) for the model publishes a
challenger; the same group repeated within the cooldown publishes nothing more (also after a
restart: the audit log remembers); both are audited; other alerts are ignored; a malformed payload
is a 400 naming the problem and the receiver keeps serving."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from conftest import ROOT

from outlierd.core.registry import Registry
from outlierd.monitoring.alerts import AlertReceiver, parse_listen, serve
from outlierd.monitoring.trigger import AUDIT_ACTION, CHALLENGER, RetrainPolicy
from outlierd.training.train import train

MODEL = "pay"
FEATURES = ("x0", "x1", "x2", "x3")


@pytest.fixture
def setup(tmp_path):
    rng = np.random.default_rng(0)
    data = tmp_path / "train.csv"
    with open(data, "w") as f:
        f.write(",".join(FEATURES) + "\n")
        np.savetxt(f, rng.normal(size=(300, len(FEATURES))), delimiter=",")
    reg = tmp_path / "reg"
    train(data, reg, MODEL, detector="robust_z", alias="champion", quiet=True)
    return Registry(reg), data


def payload(status="firing", model=MODEL, alertname="OutlierdFeatureDrift", group='{}/{severity="warning"}:{alertname="OutlierdFeatureDrift", model="pay"}'):
    """An Alertmanager webhook payload (version 4) as Alertmanager sends it for the drift rule."""
    labels = {"alertname": alertname, "model": model, "feature": "x2", "job": "outlierd", "severity": "warning"}
    return {"receiver": "outlierd-retrain", "status": status, "version": "4", "groupKey": group, "truncatedAlerts": 0,
            "groupLabels": {"alertname": alertname, "model": model}, "commonLabels": labels,
            "commonAnnotations": {"summary": "Feature x2 of model pay has drifted (PSI 0.41)"}, "externalURL": "http://alertmanager:9093",
            "alerts": [{"status": status, "labels": labels, "annotations": {"summary": "drift"}, "startsAt": "2026-12-05T07:00:00Z",
                        "endsAt": "0001-01-01T00:00:00Z", "generatorURL": "http://prometheus:9090/graph", "fingerprint": "c0ffee"}]}


def post(port: int, body, raw: bytes | None = None) -> tuple[int, dict]:
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/alerts", data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _policy(reg, data):
    return RetrainPolicy(reg.root, MODEL, data, train=train, train_kwargs={"detector": "robust_z"}, log=lambda _line: None)


def _alert_audit(reg):
    return [r for r in reg.audit(MODEL) if r["action"] == AUDIT_ACTION and r.get("kind") == "alert"]


def test_firing_alert_publishes_once_within_the_cooldown(setup):
    reg, data = setup
    receiver = AlertReceiver(_policy(reg, data), cooldown_s=600)
    httpd = serve(receiver, "127.0.0.1", 0)
    port = httpd.server_address[1]
    try:
        t0 = time.monotonic()
        code, out = post(port, payload())
        assert code == 200 and len(out["triggered"]) == 1 and out["deduplicated"] == []
        receiver.wait(60)
        published_s = time.monotonic() - t0
        assert reg.resolve(MODEL, CHALLENGER) == 2 and reg.resolve(MODEL, "champion") == 1  # never champion
        # Alertmanager repeats the group while it fires: nothing more within the cooldown
        code, out = post(port, payload())
        assert code == 200 and out["triggered"] == [] and len(out["deduplicated"]) == 1
        receiver.wait(60)
        assert reg.resolve(MODEL, CHALLENGER) == 2 and [v["version"] for v in reg.versions(MODEL)] == [1, 2]
        # resolved, another model, another alert: ignored
        for p in (payload(status="resolved"), payload(model="other"), payload(alertname="OutlierdDown")):
            assert post(port, p) == (200, {"triggered": [], "deduplicated": [], "ignored": 1})
        # malformed: a 400 naming the problem, and the receiver still answers
        assert post(port, None, raw=b"{not json") [0] == 400
        code, out = post(port, {**payload(), "version": "3"})
        assert code == 400 and 'payload version must be "4"' in out["error"]
        code, out = post(port, {**payload(), "alerts": [{"labels": {"model": 1}}]})
        assert code == 400 and "alerts[0].labels must be an object of strings" in out["error"]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
            assert r.status == 200
    finally:
        httpd.shutdown()
        receiver.close()
    audit = _alert_audit(reg)
    assert [(r["result"], r.get("version")) for r in audit] == [("published", 2), ("deduplicated", None)]
    assert audit[0]["alertname"] == "OutlierdFeatureDrift" and audit[0]["group_key"] == payload()["groupKey"]
    assert audit[0]["reason"] == "alertmanager OutlierdFeatureDrift on x2"
    print(f"alert to published challenger: {published_s:.2f}s")


def test_cooldown_survives_a_restart_and_expires(setup):
    reg, data = setup
    now = [1000.0]
    first = AlertReceiver(_policy(reg, data), cooldown_s=60, clock=lambda: now[0])
    assert len(first.handle(payload()).triggered) == 1
    first.wait(60)
    first.close()
    again = AlertReceiver(_policy(reg, data), cooldown_s=60, clock=lambda: now[0])  # a restarted receiver
    now[0] += 30
    assert len(again.handle(payload()).deduplicated) == 1  # remembered from the audit log
    assert len(again.handle(payload(group="another group")).triggered) == 1  # another group is another decision
    now[0] += 31
    assert len(again.handle(payload()).triggered) == 1  # the cooldown is over
    again.wait(120)
    again.close()
    assert [v["version"] for v in reg.versions(MODEL)] == [1, 2, 3, 4]


def test_parse_listen():
    assert parse_listen("127.0.0.1:9095") == ("127.0.0.1", 9095) and parse_listen(":80") == ("0.0.0.0", 80)
    with pytest.raises(ValueError, match="--listen must be HOST:PORT"):
        parse_listen("9095")


def test_cli_listen_publishes_then_deduplicates(setup, tmp_path):
    reg, data = setup
    with __import__("socket").socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTLIERD_")}
    proc = subprocess.Popen([sys.executable, "-m", "outlierd", "retrain-policy", "--registry", str(reg.root), "--model", MODEL,
                             "--data", str(data), "--detector", "robust_z", "--listen", f"127.0.0.1:{port}",
                             "--alert-cooldown", "300", "--max-seconds", "120"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                code, out = post(port, payload())
                break
            except (urllib.error.URLError, ConnectionError):
                assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() is not None else "not listening"
                time.sleep(0.1)
        assert code == 200 and len(out["triggered"]) == 1
        while reg.aliases(MODEL).get(CHALLENGER) is None:
            assert time.monotonic() < deadline, "no challenger published"
            time.sleep(0.1)
        assert post(port, payload())[1]["deduplicated"] == [payload()["groupKey"]]
    finally:
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert "challenger: pay version 2 (alert: alertmanager OutlierdFeatureDrift on x2)" in stdout
    assert "event=deduplicated" in stderr and "event=listening" in stderr
    assert [r["result"] for r in _alert_audit(reg)] == ["published", "deduplicated"]


def test_prefect_flow_wraps_the_same_retraining(setup):
    import importlib.util

    from outlierd import prefect_flow

    reg, data = setup
    out = prefect_flow.retrain(str(reg.root), MODEL, str(data), detector="robust_z")
    assert out["version"] == 2 and reg.resolve(MODEL, CHALLENGER) == 2 and out["kind"] == "on_demand"
    assert [r["result"] for r in reg.audit(MODEL) if r["action"] == AUDIT_ACTION] == ["published"]
    if importlib.util.find_spec("prefect") is None:
        with pytest.raises(NotImplementedError, match=r"pip install 'outlierd\[prefect\]'"):
            prefect_flow.retrain_flow  # noqa: B018 - the attribute access is the test
    else:
        assert prefect_flow.retrain_flow.name == "outlierd-retrain"
