"""Idle streams cannot lock out clients (issue 14 item 5), on a real server on 127.0.0.1.

Before: every open stream held one of ``--max-concurrent-rpcs`` slots for as long as the client
kept it open, messages or not: about 4,100 idle streams locked every client out. Now streams are
bounded per connection and per client address (RESOURCE_EXHAUSTED beyond), and a stream with no
message and nothing unanswered for ``--stream-idle-s`` is closed with UNAVAILABLE.
"""

from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import pytest
from conftest import small_server

from outlierd.server.client import request
from outlierd.server.streams import peer_address
from outlierd.v1 import scoring_pb2 as pb
from outlierd.v1 import scoring_pb2_grpc as pb_grpc

D = 4
IDLE_S = 1.5


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    with small_server(tmp_path_factory.mktemp("streams"), d=D, data_seed=2, capture=0, max_streams_per_peer=6,
                      max_streams_per_connection=4, stream_idle_s=IDLE_S) as (w, _):
        yield w


def test_peer_address():
    assert peer_address("ipv4:10.0.0.7:51234") == "10.0.0.7"
    assert peer_address("ipv6:[::1]:51234") == "[::1]"
    assert peer_address("unix:/tmp/s") == "unix:/tmp/s"


class IdleStream:
    """A ScoreStream that sends one message, then nothing until released."""

    def __init__(self, stub, X):
        self.release = threading.Event()

        def messages():
            yield request(X, request_id=1)
            self.release.wait(30)

        self.call = stub.ScoreStream(messages(), timeout=30)

    def first(self):
        return next(self.call)


def test_streams_are_bounded_per_connection_and_per_address_and_idle_ones_close(worker):
    X = np.random.default_rng(0).standard_normal((3, D)).astype(np.float32)
    target = f"127.0.0.1:{worker.port}"
    channels = [grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)]) for _ in range(3)]
    stubs = [pb_grpc.ScorerStub(ch) for ch in channels]
    streams = []
    try:
        # four on the first connection: the fifth there is refused, one on another connection is not
        for _ in range(4):
            streams.append(IdleStream(stubs[0], X))
            assert len(streams[-1].first().scores) == 3
        extra = IdleStream(stubs[0], X)
        with pytest.raises(grpc.RpcError) as e:
            extra.first()
        extra.release.set()
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "too many open streams on this connection: 4 (limit 4, --max-streams-per-connection)" in e.value.details()
        for _ in range(2):
            streams.append(IdleStream(stubs[1], X))
            assert len(streams[-1].first().scores) == 3
        # six from 127.0.0.1: the address is full, on any connection
        extra = IdleStream(stubs[2], X)
        with pytest.raises(grpc.RpcError) as e:
            extra.first()
        extra.release.set()
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "too many open streams from 127.0.0.1: 6 (limit 6, --max-streams-per-peer)" in e.value.details()
        # unary calls keep their capacity
        assert len(stubs[2].Score(request(X), timeout=10).scores) == 3
        # idle streams are closed after --stream-idle-s (and a busy one is not)
        t0 = time.monotonic()
        for s in streams:
            with pytest.raises(grpc.RpcError) as e:
                next(s.call)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
            assert e.value.details().startswith(f"stream idle for {IDLE_S:g} s")
        assert IDLE_S * 0.8 < time.monotonic() - t0 < IDLE_S * 4
        # capacity is back: a new stream on the first connection works, and stays open while it talks
        released = threading.Event()

        def talking():
            for i in range(6):
                yield request(X, request_id=i)
                time.sleep(IDLE_S / 3)
            released.set()

        out = list(stubs[0].ScoreStream(talking(), timeout=30))
        assert [r.request_id for r in out] == list(range(6)) and released.is_set()
    finally:
        for s in streams:
            s.release.set()
        for ch in channels:
            ch.close()


def test_an_idle_feedback_stream_closes_too(worker):
    with grpc.insecure_channel(f"127.0.0.1:{worker.port}") as ch:
        release = threading.Event()

        def labels():
            yield pb.FeedbackRequest(record_id="r1", label=pb.ANOMALY)
            release.wait(30)

        call = pb_grpc.ScorerStub(ch).SubmitFeedbackStream(labels(), timeout=30)
        try:
            assert next(call).record_id == "r1"
            with pytest.raises(grpc.RpcError) as e:
                next(call)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "stream idle" in e.value.details()
        finally:
            release.set()
