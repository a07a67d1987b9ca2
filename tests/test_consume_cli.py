"""`outlierd consume`'s front door: bad sources and options are one-line errors (no traceback), the
decode rules of the transport-free core, and the consumer manifest's arguments parse with the real
CLI parser."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml
from conftest import run_cli

from outlierd.server.consume import Message, MessageError, decode_json
from outlierd.server.mqtt_consumer import device_of

K8S = Path(__file__).resolve().parents[1] / "deploy" / "kubernetes"


@pytest.mark.parametrize(("args", "needle"), [
    (["--source", "nats://h:1/t", "--out", "kafka://h:1/o"], "--source must be kafka://"),
    (["--source", "kafka://h:1/t", "--out", "kafka://h:1/o"], "--group is required"),
    (["--source", "kafka://h:1/", "--group", "g", "--out", "kafka://h:1/o"], "expected kafka://HOST:PORT/TOPIC"),
])
def test_bad_sources_are_one_line_errors(tmp_path, args, needle):
    res = run_cli("consume", "--registry", str(tmp_path), "--model", "m", *args)
    assert res.returncode != 0
    assert needle in res.stderr and "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_decode_json_rules():
    names = ["a", "b"]
    assert decode_json(Message(b'{"id": "x", "a": 1, "b": 2.5}'), names, "m") == ("x", [1.0, 2.5])
    assert decode_json(Message(b'{"a": 1, "b": 2}', key=b"k1"), names, "m")[0] == "k1"  # no id: the key
    for value, reason in [(b"{", "decode"), (b"[1]", "decode"), (b'{"a": 1}', "n_features"),
                          (b'{"a": true, "b": 1}', "type"), (b'{"a": "1", "b": 1}', "type"),
                          (b'{"model": "z", "a": 1, "b": 1}', "unknown_model")]:
        with pytest.raises(MessageError) as e:
            decode_json(Message(value), names, "m")
        assert e.value.reason == reason, value


def test_device_of_topic_filters():
    assert device_of("devices/+/telemetry", "devices/d7/telemetry") == "d7"
    assert device_of("site/+/dev/#", "site/s1/dev/a/b") == "s1/a/b"
    assert device_of("plain", "plain") == "plain"


def test_consumer_manifest_args_parse_with_the_cli():
    from outlierd.cli import build_parser

    (doc,) = [d for d in yaml.safe_load_all((K8S / "consumer.yaml").read_text()) if d]
    (c,) = doc["spec"]["template"]["spec"]["containers"]
    assert c["command"] == ["outlierd", "consume"]
    args = build_parser().parse_args(["consume", *c["args"]])
    assert args.guarantee == "exactly-once" and args.instance == "$(POD_NAME)"
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert args.health_port == ports["health"] == c["startupProbe"]["grpc"]["port"]
    assert json.dumps(doc)  # plain data


def test_compose_consumer_command_parses():
    from outlierd.cli import build_parser

    compose = yaml.safe_load((K8S.parent / "compose.yaml").read_text())
    svc = compose["services"]["consumer"]
    assert svc["profiles"] == ["kafka"] and svc["build"]["args"]["OUTLIERD_EXTRAS"] == "kafka"
    args = build_parser().parse_args([*svc["entrypoint"][1:], *svc["command"]])
    assert args.source.startswith("kafka://kafka:9092/") and args.group


def test_consumer_takes_the_feedback_store_from_the_postgres_secret(monkeypatch):
    """consumer.yaml reads the Secret's URL as OUTLIERD_FEEDBACK_STORE; `consume` takes it (a URL stays
    a URL), and a flag given wins over its variable, as for serve."""
    from outlierd.cli import build_parser
    from outlierd.consume_cli import capture_settings

    docs = [d for d in yaml.safe_load_all((K8S / "postgres-secret.yaml").read_text()) if d]
    (secret,) = [d for d in docs if d["kind"] == "Secret"]
    (doc,) = [d for d in yaml.safe_load_all((K8S / "consumer.yaml").read_text()) if d]
    (c,) = doc["spec"]["template"]["spec"]["containers"]
    (ref,) = [e["valueFrom"]["secretKeyRef"] for e in c["env"] if e["name"] == "OUTLIERD_FEEDBACK_STORE"]
    assert ref["name"] == secret["metadata"]["name"] and ref["optional"] is True
    for key in list(os.environ):
        if key.startswith("OUTLIERD_"):
            monkeypatch.delenv(key)
    url = secret["stringData"][ref["key"]]
    monkeypatch.setenv("OUTLIERD_FEEDBACK_STORE", url)
    monkeypatch.setenv("OUTLIERD_CAPTURE_SAMPLE", "0.25")
    args = build_parser().parse_args(["consume", *c["args"]])
    assert capture_settings(args) == {"feedback_store": url, "capture_sample": 0.25}
    args = build_parser().parse_args(["consume", *c["args"], "--capture-sample", "1", "--no-capture",
                                      "--feedback-store", "/tmp/f.sqlite"])
    got = capture_settings(args)
    assert got["capture_sample"] == 1.0 and got["capture"] == 0 and str(got["feedback_store"]) == "/tmp/f.sqlite"
