"""Servers on the PostgreSQL store: two replicas writing one store while they are SIGKILLed (no
acknowledged label lost), and PostgreSQL stopped under load (scoring goes on, captures dropped and
counted, labels refused with UNAVAILABLE, everything resumes without a restart)."""

from __future__ import annotations

import os
import random
import threading
import time
import json
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_feedback import MODEL, Server, cardio_X, free_port, make_registry, score_request

from outlierd.monitoring.store import open_store
from outlierd.v1 import scoring_pb2 as pb
from outlierd.v1 import scoring_pb2_grpc as pb_grpc

pytest.importorskip("psycopg")


@pytest.fixture(scope="module")
def registry_dir(tmp_path_factory) -> Path:
    return make_registry(tmp_path_factory.mktemp("pgserver"))


def test_no_acknowledged_label_is_lost_two_replicas_sigkilled(registry_dir, tmp_path, pg_url):
    """As test_feedback's SIGKILL test, against PostgreSQL, with two replicas taking labels at once
    (each from its own client), killed in turn 4 times."""
    n_labels, kills = 10_000, 4
    servers = []
    for k in range(2):
        (tmp_path / f"r{k}").mkdir()
        servers.append(Server(tmp_path / f"r{k}", registry_dir, pg_url, free_port()))  # type: ignore[arg-type]
    rnd = random.Random(os.urandom(8))
    labels = [pb.FeedbackRequest(record_id=f"k{i}", label=pb.ANOMALY if rnd.random() < 0.5 else pb.NORMAL, reviewer=f"rev{i % 5}")
              for i in range(n_labels)]
    acked: dict[str, pb.FeedbackRequest] = {}
    errors: list[str] = []
    broken = [0]
    stop = threading.Event()

    def client(server: Server, todo: list[int]) -> None:
        chunk_no = 0
        while todo and not stop.is_set():
            chunk, rest = todo[:300], todo[300:]
            try:
                with grpc.insecure_channel(server.target) as ch:
                    stub = pb_grpc.ScorerStub(ch)
                    if chunk_no % 7 == 6:
                        for i in chunk:
                            ack = stub.SubmitFeedback(labels[i], timeout=10)
                            assert ack.stored and ack.record_id == labels[i].record_id
                            acked[ack.record_id] = labels[i]
                    else:
                        for ack in stub.SubmitFeedbackStream(iter([labels[i] for i in chunk]), timeout=30):
                            if ack.stored:
                                acked[ack.record_id] = labels[int(ack.record_id[1:])]
                            else:
                                errors.append(ack.error)
                todo[:] = rest
            except grpc.RpcError:
                broken[0] += 1
                todo[:] = [i for i in chunk if labels[i].record_id not in acked] + rest
                time.sleep(0.05)
            chunk_no += 1

    threads = []
    for server in servers:
        server.start()
    for k, server in enumerate(servers):
        t = threading.Thread(target=client, args=(server, list(range(k, n_labels, 2))), daemon=True)
        t.start()
        threads.append(t)
    try:
        for j, threshold in enumerate(sorted(rnd.sample(range(500, n_labels - 500), kills))):
            while len(acked) < threshold and any(t.is_alive() for t in threads):
                time.sleep(0.005)
            time.sleep(rnd.uniform(0, 0.02))
            victim = servers[j % 2]  # each replica killed twice, while the other keeps writing
            victim.kill()
            victim.start()
        for t in threads:
            t.join(120)
        assert not any(t.is_alive() for t in threads), "clients still sending"
    finally:
        stop.set()
        for server in servers:
            server.kill()
    assert not errors, errors[:5]
    assert broken[0] >= 1, "no call was cut by a kill: the test did not test anything"
    assert len(acked) == n_labels
    s = open_store(pg_url)
    try:
        stored = {(r.record_id, r.label, r.reviewer) for r in s.labels(MODEL)}
    finally:
        s.close()
    names = {pb.ANOMALY: "anomaly", pb.NORMAL: "normal"}
    missing = [rid for rid, req in acked.items() if (rid, names[req.label], req.reviewer) not in stored]
    assert not missing, f"{len(missing)} acknowledged labels are not in the store, e.g. {missing[:5]}"


def _metrics(port: int) -> dict[tuple[str, tuple], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for fam in text_string_to_metric_families(text) for s in fam.samples}


def _total(metrics: dict, name: str, **labels: str) -> float:
    return sum(v for (n, ls), v in metrics.items() if n == name and all(dict(ls).get(k) == x for k, x in labels.items()))


def test_postgres_stopped_under_load(registry_dir, tmp_path, pg_cluster):
    """PostgreSQL stopped for 10 s while records stream in: scoring never fails nor stalls, captures
    of that time are dropped and counted (outlierd_capture_dropped_total{reason="write_error"}),
    labels are refused with UNAVAILABLE (and are not in the store afterwards), and once PostgreSQL
    is back, labels are stored and captures written again, without restarting the server."""
    url = pg_cluster.url
    metrics_port = free_port()
    server = Server(tmp_path, registry_dir, url, free_port())  # type: ignore[arg-type]
    server.cmd[server.cmd.index("--metrics-port") + 1] = str(metrics_port)
    server.cmd += ["--capture-sample", "0.05"]
    X = cardio_X()
    done = threading.Event()
    scored: list[tuple[float, float]] = []  # (answered at, seconds the call took)
    failures: list[str] = []

    def load() -> None:
        with grpc.insecure_channel(server.target) as ch:
            stub = pb_grpc.ScorerStub(ch)
            i = 0
            while not done.is_set():
                rows = X[(i * 64) % (len(X) - 64):][:64]
                t0 = time.monotonic()
                try:
                    stub.Score(score_request(rows, [f"s{i}-{j}" for j in range(64)], request_id=i), timeout=10)
                    scored.append((time.monotonic(), time.monotonic() - t0))
                except grpc.RpcError as e:
                    failures.append(f"{e.code()}: {e.details()}")
                i += 1
                time.sleep(0.005)

    def label(rid: str) -> grpc.StatusCode | None:
        with grpc.insecure_channel(server.target) as ch:
            try:
                ack = pb_grpc.ScorerStub(ch).SubmitFeedback(pb.FeedbackRequest(model=MODEL, record_id=rid, label=pb.ANOMALY), timeout=10)
                assert ack.stored
                return None
            except grpc.RpcError as e:
                return e.code()

    server.start()
    loader = threading.Thread(target=load, daemon=True)
    loader.start()
    try:
        time.sleep(2.0)
        assert label("before") is None
        before = _metrics(metrics_port)
        assert _total(before, "outlierd_captured_total") > 0
        pg_cluster.stop()
        stopped_at = time.monotonic()
        refused = []
        while time.monotonic() - stopped_at < 10.0:
            code = label(f"during-{len(refused)}")
            assert code == grpc.StatusCode.UNAVAILABLE, code
            refused.append(code)
            time.sleep(0.5)
        during = _metrics(metrics_port)
        pg_cluster.start()
        restarted_at = time.monotonic()
        # labels work again on the same server: the store reconnects on its own
        deadline = time.monotonic() + 20
        while label("after") is not None:
            assert time.monotonic() < deadline, "labels still refused 20 s after PostgreSQL came back"
            time.sleep(0.2)
        deadline = time.monotonic() + 20
        while _total(_metrics(metrics_port), "outlierd_captured_total") <= _total(during, "outlierd_captured_total"):
            assert time.monotonic() < deadline, "captures not written 20 s after PostgreSQL came back"
            time.sleep(0.2)
        after = _metrics(metrics_port)
    finally:
        done.set()
        loader.join(15)
        server.kill()
    assert not failures, failures[:5]
    in_outage = [(t, dt) for t, dt in scored if stopped_at <= t <= restarted_at]
    assert len(in_outage) > 20, "scoring stalled while PostgreSQL was down"
    gaps = np.diff([stopped_at] + [t for t, _ in in_outage] + [restarted_at])
    # scoring never waits on the store: no call stalls, no gap between answers (generous bound: a busy 2-core box)
    assert gaps.max() < 2.0 and max(dt for _, dt in in_outage) < 2.0, (gaps.max(), max(dt for _, dt in in_outage))
    dropped = _total(during, "outlierd_capture_dropped_total", reason="write_error") - _total(before, "outlierd_capture_dropped_total",
                                                                                              reason="write_error")
    assert dropped > 0, "captures during the outage were neither written nor counted as dropped"
    assert _total(after, "outlierd_feedback_store_retries_total", result="failed") >= len(refused)  # the label side's lost connections, counted
    assert _total(after, "outlierd_feedback_store_retries_total", result="retry") > 0
    assert len(refused) >= 5  # each refusal waits out the store's connection retries (about 1.3 s)
    print(f"outage: {len(in_outage)} calls answered, max gap {gaps.max():.3f}s, max call {max(dt for _, dt in in_outage):.3f}s, "
          f"{dropped:.0f} captures dropped, {len(refused)} labels refused")
    s = open_store(url)
    try:
        ids = {r.record_id for r in s.labels(MODEL)}
    finally:
        s.close()
    assert {"before", "after"} <= ids and not any(i.startswith("during") for i in ids)  # refused means not stored


@pytest.fixture(scope="module")
def shadow_registry(tmp_path_factory) -> Path:
    """cardio: champion version 1 and a challenger (version 2, another seed) for shadow scoring."""
    from conftest import dataset_path

    from outlierd.training.train import train

    reg = tmp_path_factory.mktemp("pgshadow") / "reg"
    train(dataset_path("cardio"), reg, MODEL, alias="champion", label_column="label", alert_rate=0.05, quiet=True)
    train(dataset_path("cardio"), reg, MODEL, alias="challenger", label_column="label", alert_rate=0.05, quiet=True, seed=7)
    return reg


def _cli_json(*argv: str) -> dict:
    import contextlib
    import io

    from outlierd.cli import main as cli_main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = cli_main(list(argv))
    assert rc == 0, buf.getvalue()
    return json.loads(buf.getvalue())


def _strip(d, drop=("store", "feedback_store", "since", "latency", "time", "created", "by", "window")):
    """``d`` without what depends on the store's name, the clock or the machine's speed."""
    if isinstance(d, dict):
        return {k: _strip(v, drop) for k, v in d.items() if not any(x in k for x in drop)}
    if isinstance(d, list):
        return [_strip(v, drop) for v in d]
    return d


def _publish_mqtt(port: int, X: np.ndarray, rows: list[int]) -> None:
    """Each of ``rows`` as one QoS 1 JSON telemetry message ``{"id": "c<row>", "x0": ...}``, acknowledged."""
    import paho.mqtt.client as mqtt

    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="pg-telemetry", protocol=mqtt.MQTTv311)
    c.max_inflight_messages_set(1000)
    c.connect("127.0.0.1", port, keepalive=10)
    c.loop_start()
    try:
        infos = [c.publish(f"devices/d{i % 7}/telemetry", json.dumps({"id": f"c{i}", **{f"x{j}": float(v) for j, v in enumerate(X[i])}}),
                           qos=1) for i in rows]
        for info in infos:
            info.wait_for_publish(30)
    finally:
        c.disconnect()
        c.loop_stop()


def _consumer_subscribed(port: int, timeout: float = 30.0) -> None:
    """Until the consumer's subscription is in place: a probe for another model comes back on the DLQ
    (dead letters are not captured, so the stores see nothing of it)."""
    import paho.mqtt.client as mqtt

    got = threading.Event()
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="pg-probe", protocol=mqtt.MQTTv311)
    c.on_message = lambda cl, u, msg: got.set()
    c.connect("127.0.0.1", port, keepalive=10)
    c.subscribe("dlq", qos=1)
    c.loop_start()
    try:
        deadline = time.monotonic() + timeout
        while not got.wait(0.5):
            assert time.monotonic() < deadline, "the consumer never dead-lettered the probe"
            c.publish("devices/probe/telemetry", json.dumps({"id": "probe", "model": "not-served"}), qos=1)
    finally:
        c.disconnect()
        c.loop_stop()


def test_two_replicas_and_a_consumer_capture_into_one_store_like_one_sqlite_store(shadow_registry, tmp_path, pg_url):
    """The same traffic (every record captured, shadow scoring on) and the same labels, sent a third
    to each of two replicas and to one `outlierd consume` (MQTT) on one PostgreSQL store, and all to
    one server on a SQLite store: feedback stats, threshold calibrate and compare give the same
    answers from both stores."""
    from brokers import Mosquitto

    X = cardio_X()
    n = len(X)
    sqlite_path = tmp_path / "one.sqlite"
    extra = ["--capture-sample", "1.0", "--rollout", "shadow"]
    servers = []
    for k, store in enumerate((pg_url, pg_url, sqlite_path)):
        (tmp_path / f"s{k}").mkdir()
        srv = Server(tmp_path / f"s{k}", shadow_registry, store, free_port())  # type: ignore[arg-type]
        srv.cmd += extra
        servers.append(srv)
    (tmp_path / "broker").mkdir()
    broker = Mosquitto(tmp_path / "broker")
    mqtt = f"mqtt://127.0.0.1:{broker.port}"
    (tmp_path / "c").mkdir()
    consumer = Server(tmp_path / "c", shadow_registry, pg_url, free_port())  # type: ignore[arg-type]
    consumer.cmd = [*consumer.cmd[:3], "consume", "--registry", str(shadow_registry), "--model", MODEL,
                    "--source", f"{mqtt}/devices/+/telemetry", "--out", f"{mqtt}/scores", "--dlq", f"{mqtt}/dlq",
                    "--group", "pg-consumer", "--threads", "1", "--health-port", consumer.target.rsplit(":", 1)[1],
                    "--feedback-store", pg_url, *extra]
    servers.append(consumer)
    http_port = free_port()
    servers[0].cmd += ["--http-port", str(http_port)]  # the review queue over HTTP too
    rnd = np.random.default_rng(3)
    labelled = rnd.choice(n, 400, replace=False)
    y = np.loadtxt(__import__("conftest").dataset_path("cardio"), delimiter=",", skiprows=1)[:, -1]
    try:
        for srv in servers:
            srv.start()
        _consumer_subscribed(broker.port)
        for k, srv in enumerate(servers[:3]):
            with grpc.insecure_channel(srv.target) as ch:
                stub = pb_grpc.ScorerStub(ch)
                # the SQLite server: every 64-record message; each replica and the consumer: every third one
                for s in (range(0, n, 64) if k == 2 else range(k * 64, n, 192)):
                    part = X[s:s + 64]
                    stub.Score(score_request(part, [f"c{s + j}" for j in range(len(part))], request_id=s), timeout=10)
        _publish_mqtt(broker.port, X, [i for s in range(128, n, 192) for i in range(s, min(s + 64, n))])
        # captures are written within ~100 ms of scoring; shadow scores a moment later
        for store in (pg_url, sqlite_path):
            deadline = time.monotonic() + 30
            while True:
                s = open_store(store)
                try:
                    got = len(s.predictions(MODEL, features=False))
                finally:
                    s.close()
                if got >= 2 * n:
                    break
                assert time.monotonic() < deadline, f"{store}: {got} of {2 * n} captures"
                time.sleep(0.2)
        for k, srv in enumerate(servers[:3]):
            with grpc.insecure_channel(srv.target) as ch:
                stub = pb_grpc.ScorerStub(ch)
                mine = labelled if k == 2 else labelled[k::2]
                reqs = [pb.FeedbackRequest(model=MODEL, record_id=f"c{i}", label=pb.ANOMALY if y[i] else pb.NORMAL, reviewer="r")
                        for i in sorted(mine)]
                assert all(a.stored and a.known_record for a in stub.SubmitFeedbackStream(iter(reqs), timeout=30))
        base = f"http://127.0.0.1:{http_port}/v1/models"
        with urllib.request.urlopen(f"{base}/{MODEL}/review-queue?limit=5000&top_k=2", timeout=30) as r:
            over_http = json.loads(r.read())["alerts"]
        for query, code, words in (("cardio/review-queue?since_s=-1", 400, "since_s must be > 0"),
                                   ("nope/review-queue", 404, "nope")):
            with pytest.raises(urllib.error.HTTPError) as err:
                urllib.request.urlopen(f"{base}/{query}", timeout=30)
            assert err.value.code == code and words in json.loads(err.value.read())["error"]
    finally:
        for srv in servers:
            srv.kill()
        broker.stop()
    common = ["--registry", str(shadow_registry), "--model", MODEL]
    answers = []
    for store in (pg_url, str(sqlite_path)):
        fs = ["--feedback-store", store]
        answers.append({
            "stats": _cli_json("feedback", "stats", *common, *fs, "--json"),
            "calibrate_rate": _cli_json("threshold", "calibrate", *common, *fs, "--alert-rate", "0.02", "--dry-run", "--json"),
            "calibrate_precision": _cli_json("threshold", "calibrate", *common, *fs, "--precision", "0.5", "--dry-run", "--json"),
            "compare": _cli_json("compare", *common, *fs, "--json"),
            "queue": _cli_json("feedback", "queue", *common, *fs, "--limit", "5000", "--top-k", "2", "--json"),
        })
    pg, lite = (_strip(a) for a in answers)
    assert pg["stats"]["labels"] == 400 and pg["stats"]["captured_flagged"] > 0
    print({k: v for k, v in pg["compare"].items() if not isinstance(v, dict)}, pg["calibrate_rate"].get("threshold"),
          pg["calibrate_precision"].get("threshold"), pg["stats"]["precision"])
    # the review queue: every flagged record without a label, explained (order: capture order, which the replicas interleave)
    flagged = {r["record_id"] for r in pg["queue"]["alerts"]}
    assert flagged and not flagged & {f"c{i}" for i in labelled} and all(len(r["top_features"]) == 2 for r in pg["queue"]["alerts"])
    assert sorted(over_http, key=lambda r: r["record_id"]) == sorted(answers[0]["queue"]["alerts"], key=lambda r: r["record_id"])
    pg["queue"]["alerts"].sort(key=lambda r: r["record_id"])
    lite["queue"]["alerts"].sort(key=lambda r: r["record_id"])
    for key in pg:
        assert pg[key] == lite[key], key
