"""``FeedbackAck.known_record`` right after a record is scored (issue 14 item 14).

Captures reach the store in frames about every 100 ms, so a labeller that answers at once was told
its ids were unknown for 100-200 ms. Now a label whose id is not (yet) in the store waits for the
captures in flight and is looked up again; an id that was never scored is still unknown.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import small_server

from outlierd.server.client import ScorerClient
from outlierd.v1 import scoring_pb2 as pb


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    root = tmp_path_factory.mktemp("known")
    # every record captured (sample 1.0), so every scored id must be known
    with small_server(root, d=4, data_seed=4, capture_sample=1.0, feedback_store=root / "fb.sqlite") as (w, _):
        yield w


def test_a_label_right_after_scoring_finds_its_record(worker):
    X = np.random.default_rng(9).standard_normal((20, 4)).astype(np.float32)
    with ScorerClient(f"127.0.0.1:{worker.port}") as client:
        for i in range(5):  # each labelled the moment its answer arrives
            ids = [f"m{i}-r{j}" for j in range(4)]
            client.score(X[4 * i:4 * i + 4], ids=ids)
            ack = client.stub.SubmitFeedback(pb.FeedbackRequest(record_id=ids[1], label=pb.ANOMALY, reviewer="bot"), timeout=10)
            assert (ack.stored, ack.known_record) == (True, True), i
        ack = client.stub.SubmitFeedback(pb.FeedbackRequest(record_id="never-scored", label=pb.NORMAL), timeout=10)
        assert (ack.stored, ack.known_record) == (True, False)
