"""Raw events through the server: the features computed online equal the offline replay for every
event, across a worker restart (checkpoint restored) and a hot reload; bad events get errors naming
the column and the row and the stream goes on."""

from __future__ import annotations

import time

import grpc
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from prometheus_client import CollectorRegistry

from conftest import LoopThread, run_cli
from outlierd.core.features import engine_for
from outlierd.core.model import load_model
from outlierd.core.registry import Registry
from outlierd.monitoring.metrics import ServiceMetrics
from outlierd.payments import payments
from outlierd.server.app import start_worker
from outlierd.server.client import ScorerClient
from outlierd.server.settings import ServeSettings

SPEC = "data/payments.features.json"
N = 20000


@pytest.fixture(scope="module")
def events():
    return payments(N, 400, days=3, seed=11)


@pytest.fixture(scope="module")
def registry_dir(tmp_path_factory, events):
    root = tmp_path_factory.mktemp("featreg")
    pq.write_table(events.slice(0, 8000), root / "train.parquet")
    r = run_cli("train", "--events", str(root / "train.parquet"), "--features", SPEC, "--registry", str(root / "reg"),
                "--model", "pay", "--alias", "champion", "--quiet")
    assert r.returncode == 0, r.stderr
    return root


@pytest.fixture(scope="module")
def loop_thread():
    lt = LoopThread()
    yield lt
    lt.close()


def _start(loop_thread, registry_dir, state_dir, **kw):
    settings = ServeSettings(registry=registry_dir / "reg", model="pay", host="127.0.0.1", port=0, feature_state_dir=state_dir,
                             feature_checkpoint_s=0.0, reload_interval_s=0.05, capture=0, **kw)
    settings.validate()
    metrics = CollectorRegistry()
    return loop_thread.call(start_worker(settings, ServiceMetrics(metrics))), metrics


def _chunks(table: pa.Table, sizes):
    start = 0
    for size in sizes:
        if start >= table.num_rows:
            return
        yield table.slice(start, int(size))
        start += int(size)


def test_online_features_equal_the_replay_across_restart_and_reload(loop_thread, registry_dir, events, tmp_path):
    artifact = Registry(registry_dir / "reg").path("pay", 1)
    offline = engine_for(artifact).replay(events)
    model = load_model(artifact)
    sizes = np.random.default_rng(4).integers(1, 400, 400)
    chunks = list(_chunks(events, sizes))
    third = len(chunks) // 3
    got = []
    worker, metrics = _start(loop_thread, registry_dir, tmp_path)
    try:
        with ScorerClient(f"127.0.0.1:{worker.port}") as client:
            for r in client.score_events_stream(chunks[:third], id_column="event_id", return_features=True):
                assert not r.error
                got.append(r.features)
                if len(got) == 1:  # the scores are the model's on those features
                    np.testing.assert_allclose(r.scores, model.score(r.features.astype(np.float32)), rtol=1e-6)
    finally:
        loop_thread.call(worker.stop(1.0))  # graceful stop: the state is checkpointed
    assert metrics.get_sample_value("outlierd_feature_events_total", {"model": "pay"}) == sum(c.num_rows for c in chunks[:third])
    worker, metrics = _start(loop_thread, registry_dir, tmp_path)  # a new worker restores the checkpoint
    try:
        with ScorerClient(f"127.0.0.1:{worker.port}") as client:
            for r in client.score_events_stream(chunks[third:2 * third], return_features=True):
                assert not r.error
                got.append(r.features)
            # hot reload: a new version with the same spec keeps the entity state
            reg = Registry(registry_dir / "reg")
            v2 = reg.publish("pay", artifact, aliases=("champion",))
            deadline = time.monotonic() + 10
            while worker.slot.current.version != v2 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert worker.slot.current.version == v2
            versions = set()
            for r in client.score_events_stream(chunks[2 * third:], return_features=True):
                assert not r.error
                versions.add(r.version)
                got.append(r.features)
            assert versions == {v2}
    finally:
        loop_thread.call(worker.stop(1.0))
    online = np.vstack(got)
    assert online.shape == offline.shape
    assert np.array_equal(online, offline, equal_nan=True)  # bit-equal, every feature, every event


def test_bad_events_are_answered_and_the_stream_goes_on(loop_thread, registry_dir, events, tmp_path):
    good = events.slice(0, 300)
    bad_time = events.slice(300, 50).set_column(7, "ts", pa.array(["not a time"] * 50))
    bad_key = events.slice(350, 50).set_column(1, "card_id", pa.array([None] * 3 + ["c1"] * 47, pa.string()))
    missing = events.slice(400, 50).drop_columns(["amount"])
    rest = events.slice(450, 300)
    worker, metrics = _start(loop_thread, registry_dir, None)
    try:
        with ScorerClient(f"127.0.0.1:{worker.port}") as client:
            answers = list(client.score_events_stream([good, bad_time, bad_key, missing, rest], return_features=True))
            info = client.model_info()
            assert list(info.feature_names)[:2] == ["amount", "mcc"]
    finally:
        loop_thread.call(worker.stop(1.0))
    assert [bool(a.error) for a in answers] == [False, True, True, True, False]
    assert "column 'ts' row 0: cannot parse event time 'not a time'" in answers[1].error
    assert "column 'card_id' row 0: missing entity key" in answers[2].error
    assert "column 'amount' is missing" in answers[3].error
    # refused messages left the state alone: the rest equals a replay without them
    engine = engine_for(Registry(registry_dir / "reg").path("pay", 1))
    want = engine.replay(pa.concat_tables([good, rest]))
    assert np.array_equal(np.vstack([answers[0].features, answers[4].features]), want, equal_nan=True)
    assert metrics.get_sample_value("outlierd_invalid_inputs_total", {"reason": "events"}) == 3


def test_unary_score_events_and_refusals(loop_thread, registry_dir, events, tmp_path):
    worker, _ = _start(loop_thread, registry_dir, None)
    try:
        with ScorerClient(f"127.0.0.1:{worker.port}") as client:
            r = client.score_events(events.slice(0, 100), id_column="event_id")
            assert r.ids[:2] == ["e0", "e1"] and r.scores.shape == (100,) and r.features is None
            with pytest.raises(grpc.RpcError) as e:
                client.stub.Score(client_request(b"not arrow"))
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "not an Arrow IPC stream" in e.value.details()
    finally:
        loop_thread.call(worker.stop(1.0))


def test_two_workers_give_the_replay_s_features(loop_thread, registry_dir, events, tmp_path):
    """Two workers on one port (SO_REUSEPORT): each message on a new connection lands on either; each
    entity's events are applied by its owner, in order: the online features equal the replay."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    workers = []
    for index in range(2):
        settings = ServeSettings(registry=registry_dir / "reg", model="pay", host="127.0.0.1", port=port, workers=2, capture=0,
                                 feature_state_dir=tmp_path, feature_checkpoint_s=0.0)
        metrics = CollectorRegistry()
        workers.append((loop_thread.call(start_worker(settings, ServiceMetrics(metrics), worker_index=index)), metrics))
    stream = events.slice(0, 6000)
    got = []
    try:
        for chunk in _chunks(stream, [150] * 40):
            with ScorerClient(f"127.0.0.1:{port}") as client:  # a new connection: either worker answers
                r = client.score_events(chunk, return_features=True)
                got.append(r.features)
    finally:
        for worker, _ in workers:
            loop_thread.call(worker.stop(1.0))
    offline = engine_for(Registry(registry_dir / "reg").path("pay", 1)).replay(stream)
    assert np.array_equal(np.vstack(got), offline, equal_nan=True)
    counted = [m.get_sample_value("outlierd_feature_events_total", {"model": "pay"}) or 0 for _, m in workers]
    assert sum(counted) == stream.num_rows and min(counted) > 0  # both workers own entities
    assert sorted(p.name for p in tmp_path.glob("pay.features.w*")) == ["pay.features.w0of2.npz", "pay.features.w1of2.npz"]


def client_request(data: bytes):
    from outlierd.v1 import scoring_pb2 as pb

    return pb.ScoreRequest(arrow_events=data)
