"""Bytes that are not a valid message, on a real server (127.0.0.1), over raw-bytes calls.

Before: a unary call got UNKNOWN ("Unexpected <class 'DecodeError'>...") with a traceback logged,
and a stream ended with OK at the bad message, silently dropping it and every message after it (on
the feedback stream: labels the client sent were lost while the call succeeded). Now the bad
message is answered INVALID_ARGUMENT naming its position, and the stream goes on.
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from conftest import small_server

from outlierd.monitoring.store import open_store
from outlierd.server.client import request
from outlierd.v1 import scoring_pb2 as pb

TRUNCATED = b"\x0a\x05ab"  # field 1 (a string) says 5 bytes, 2 follow
BAD_UTF8 = b"\x0a\x02\xff\xfe"  # field 1 (a string) holds invalid UTF-8
TIMEOUT = 30.0


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("undecodable")
    with small_server(root, d=4, data_seed=3, feedback_store=root / "fb.sqlite") as (worker, metrics):
        X = np.random.default_rng(3).standard_normal((500, 4))
        yield worker, metrics, X.astype(np.float32), root / "fb.sqlite"


def _call(worker, kind: str, method: str):
    ch = grpc.insecure_channel(f"127.0.0.1:{worker.port}")
    return ch, getattr(ch, kind)(f"/outlierd.v1.Scorer/{method}")  # raw bytes in and out


@pytest.mark.parametrize("bad", [TRUNCATED, BAD_UTF8])
def test_undecodable_unary_is_invalid_argument(served, bad):
    worker, metrics, X, _ = served
    before = metrics.get_sample_value("outlierd_invalid_inputs_total", {"reason": "decode"}) or 0
    for method in ("Score", "GetModelInfo", "SubmitFeedback"):
        ch, call = _call(worker, "unary_unary", method)
        with ch, pytest.raises(grpc.RpcError) as e:
            call(bad, timeout=TIMEOUT)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, e.value.details())
        assert e.value.details().startswith("the request is not a valid outlierd.v1."), e.value.details()
    assert metrics.get_sample_value("outlierd_invalid_inputs_total", {"reason": "decode"}) == before + 1  # Score counts
    ch, call = _call(worker, "unary_unary", "Score")
    with ch:  # and the server goes on
        resp = pb.ScoreResponse.FromString(call(request(X[:3]).SerializeToString(), timeout=TIMEOUT))
    assert len(resp.scores) == 3


@pytest.mark.parametrize("bad", [TRUNCATED, BAD_UTF8])
def test_a_bad_stream_message_is_answered_and_the_stream_goes_on(served, bad):
    worker, _, X, _ = served
    msgs = [request(X[i * 3:(i + 1) * 3], request_id=i + 1).SerializeToString() for i in range(3)]
    ch, call = _call(worker, "stream_stream", "ScoreStream")
    with ch:
        it = call(iter([msgs[0], bad, msgs[1], msgs[2]]), timeout=TIMEOUT)
        responses = [pb.ScoreResponse.FromString(r) for r in it]
        assert it.code() == grpc.StatusCode.OK
    assert [r.request_id for r in responses] == [1, 0, 2, 3]
    assert responses[1].error.startswith("INVALID_ARGUMENT: message 2 of the stream is not a valid outlierd.v1.ScoreRequest")
    assert [len(r.scores) for r in responses] == [3, 0, 3, 3] and not any(r.error for r in responses[2:])


def test_no_label_after_a_bad_feedback_message_is_lost(served):
    worker, _, _, store_path = served
    labels = [pb.FeedbackRequest(record_id=f"r{i}", label=pb.ANOMALY if i % 2 else pb.NORMAL, reviewer="t").SerializeToString()
              for i in range(4)]
    ch, call = _call(worker, "stream_stream", "SubmitFeedbackStream")
    with ch:
        acks = [pb.FeedbackAck.FromString(a) for a in call(iter([labels[0], labels[1], BAD_UTF8, labels[2], labels[3]]),
                                                            timeout=TIMEOUT)]
    assert [(a.record_id, a.stored) for a in acks] == [("r0", True), ("r1", True), ("", False), ("r2", True), ("r3", True)]
    assert acks[2].error.startswith("INVALID_ARGUMENT: message 3 of the stream is not a valid outlierd.v1.FeedbackRequest")
    stored = {(r.record_id, r.label) for r in open_store(store_path).labels("m")}
    assert {("r0", "normal"), ("r1", "anomaly"), ("r2", "normal"), ("r3", "anomaly")} <= stored
