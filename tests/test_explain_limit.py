"""An explain answer that cannot fit in one message is refused up front (issue 14 item 19).

Before: explain on a large request ran for seconds, then failed sending the answer (over the
transport's message limit). Now a request whose every record is explained is refused before
scoring, INVALID_ARGUMENT naming the size and the limit (``--max-message-bytes``); with
``explain_flagged_only`` the size is known after scoring and checked then; smaller requests work.
"""

from __future__ import annotations

import time

import grpc
import numpy as np
import pytest
from conftest import small_server

from outlierd.core.registry import Registry
from outlierd.server.client import request
from outlierd.v1 import scoring_pb2_grpc as pb_grpc

D = 8
LIMIT = 1 << 20  # 1 MiB: 20,000 records of 8 float32 (640 KB) fit; their full explanation does not


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    with small_server(tmp_path_factory.mktemp("explain-limit"), d=D, data_seed=6, capture=0, max_message_bytes=LIMIT) as served:
        yield served


def _req(n, **kw):
    X = np.random.default_rng(n).standard_normal((n, D)).astype(np.float32)
    req = request(X)
    for k, v in kw.items():
        setattr(req, k, v)
    return req


def test_an_explanation_too_large_to_send_is_refused_up_front(worker):
    w, metrics = worker
    with grpc.insecure_channel(f"127.0.0.1:{w.port}", options=[("grpc.max_receive_message_length", 64 << 20),
                                                               ("grpc.max_send_message_length", 64 << 20)]) as ch:
        stub = pb_grpc.ScorerStub(ch)
        with pytest.raises(grpc.RpcError) as e:
            stub.Score(_req(20_000, explain=True, top_k=3), timeout=30)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "explain: the answer for 20000 explained records would be about" in e.value.details()
        assert "over the 1 MiB message limit (--max-message-bytes)" in e.value.details()
        # on a stream: that message is answered with the error, the next one is scored
        out = list(stub.ScoreStream(iter([_req(20_000, explain=True, request_id=1), _req(100, explain=True, request_id=2)]),
                                    timeout=30))
        assert out[0].error.startswith("INVALID_ARGUMENT: explain: the answer for 20000") and not out[0].scores
        assert not out[1].error and len(out[1].explanations) == 100
        # scores alone fit, and flagged-only explanations of a few records fit
        assert len(stub.Score(_req(20_000), timeout=30).scores) == 20_000
        resp = stub.Score(_req(20_000, explain=True, explain_flagged_only=True), timeout=30)
        assert len(resp.scores) == 20_000 and 0 < len(resp.explanations) == sum(resp.anomalous) < 20_000
        # every record flagged (a threshold below every score): flagged-only is refused once scored
        Registry(w.settings.registry).publish_threshold("m", 1, 0.0)
        deadline = time.monotonic() + 10
        while w.slot.current.threshold != 0.0:
            assert time.monotonic() < deadline, "threshold not picked up"
            time.sleep(0.05)
        with pytest.raises(grpc.RpcError) as e:
            stub.Score(_req(20_000, explain=True, explain_flagged_only=True), timeout=30)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "explain: the answer for 20000 explained records" in e.value.details()
    assert metrics.get_sample_value("outlierd_invalid_inputs_total", {"reason": "too_large"}) == 3
