"""``FeedbackAck.known_record`` right after a record is scored (issue 14 item 14).

Captures reach the store in frames about every 100 ms, so a labeller that answers at once was told
its ids were unknown for 100-200 ms. Now a label whose id is not (yet) in the store waits for the
captures in flight and is looked up again; an id that was never scored is still unknown.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import LoopThread
from prometheus_client import CollectorRegistry

from outlierd.core.registry import Registry
from outlierd.monitoring.metrics import ServiceMetrics
from outlierd.server.app import start_worker
from outlierd.server.client import ScorerClient
from outlierd.server.settings import ServeSettings
from outlierd.v1 import scoring_pb2 as pb


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    from sklearn.ensemble import IsolationForest

    from outlierd.training.export import export_sklearn

    root = tmp_path_factory.mktemp("known")
    X = np.random.default_rng(4).standard_normal((500, 4))
    Registry(root / "reg").publish("m", export_sklearn(IsolationForest(n_estimators=10, random_state=0).fit(X), root / "a",
                                                       X_train=X), aliases=("champion",))
    loop = LoopThread()
    # every record captured (sample 1.0), so every scored id must be known
    settings = ServeSettings(registry=root / "reg", model="m", host="127.0.0.1", port=0, metrics_port=0, drift=0,
                             capture_sample=1.0, feedback_store=root / "fb.sqlite")
    w = loop.call(start_worker(settings, ServiceMetrics(CollectorRegistry())))
    yield w
    loop.call(w.stop(1.0))
    loop.close()


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
