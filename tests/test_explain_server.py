"""Explanations over gRPC (ScoreRequest.explain / top_k / explain_flagged_only) against a real
server on 127.0.0.1: the response's explanations equal ``Model.explain`` of the served model, one
per explained record, in record order; bad top_k is INVALID_ARGUMENT (reason "explain")."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest
from test_server import LoopThread, serving

from outlierd.core import load_model
from outlierd.core.registry import Registry
from outlierd.v1 import scoring_pb2_grpc as pb_grpc
from outlierd.server.client import request

D = 8
PLANTED = (2, 5)
TIMEOUT = 10.0
NAME = "planted"


@pytest.fixture(scope="module")
def registry_dir(tmp_path_factory) -> Path:
    """One iforest on 8 features, threshold at the training scores' 90th percentile."""
    from sklearn.ensemble import IsolationForest

    from outlierd.training.export import export_sklearn

    rng = np.random.default_rng(11)  # the model is fixed; the records scored are fresh per test
    X = rng.normal(size=(2000, D))
    forest = IsolationForest(n_estimators=100, random_state=0).fit(X)
    root = tmp_path_factory.mktemp("explain-registry")
    threshold = float(np.quantile(-forest.score_samples(X), 0.9))
    path = export_sklearn(forest, root / "artifact", [f"x{j}" for j in range(D)], threshold=threshold, X_train=X)
    reg_dir = root / "reg"
    assert Registry(reg_dir).publish(NAME, path, aliases=("champion",)) == 1
    return reg_dir


@pytest.fixture(scope="module")
def model(registry_dir):
    return load_model(Registry(registry_dir).path(NAME, 1))


@pytest.fixture(scope="module")
def server(registry_dir):
    lt = LoopThread()
    try:
        with serving(lt, registry_dir, model=NAME) as running:
            yield running
    finally:
        lt.close()


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.target) as ch:
        yield pb_grpc.ScorerStub(ch)


def _records(rng, n: int, n_anom: int) -> np.ndarray:
    X = rng.normal(size=(n, D))
    rows = rng.choice(n, size=n_anom, replace=False)
    X[np.ix_(rows, list(PLANTED))] += 6 * rng.choice([-1.0, 1.0], size=(n_anom, len(PLANTED)))
    return X.astype(np.float32)


def _explain_request(X, **kw):
    req = request(X, raw=kw.pop("raw", True), request_id=kw.pop("request_id", 0))
    req.explain = True
    for k, v in kw.items():
        setattr(req, k, v)
    return req


def _assert_explanations(resp, model, X, top_k: int, explained: np.ndarray) -> None:
    features, contributions = model.explain(X, top_k=top_k)
    assert [e.record for e in resp.explanations] == np.flatnonzero(explained).tolist()
    for e in resp.explanations:
        assert list(e.features) == features[e.record].tolist()
        assert list(e.contributions) == contributions[e.record].tolist()  # doubles, bit for bit
        assert list(e.feature_names) == [model.feature_names[j] for j in features[e.record]]


@pytest.mark.parametrize("n", [1, 40, 1500])  # small (would be micro-batched) and large requests
@pytest.mark.parametrize("raw", [True, False], ids=["raw_values", "values"])
def test_explain_every_record(stub, model, rng, n, raw):
    X = _records(rng, n, max(1, n // 20))
    resp = stub.Score(_explain_request(X, top_k=4, raw=raw, request_id=9), timeout=TIMEOUT)
    scores = np.asarray(resp.scores)
    np.testing.assert_array_equal(scores, model.score(X))
    assert list(resp.anomalous) == (scores >= model.threshold).tolist() and resp.request_id == 9
    _assert_explanations(resp, model, X, 4, np.ones(n, dtype=bool))


def test_explain_flagged_only_and_planted_features(stub, model, rng):
    X = _records(rng, 300, 15)
    resp = stub.Score(_explain_request(X, top_k=2, explain_flagged_only=True), timeout=TIMEOUT)
    flagged = np.asarray(resp.anomalous)
    assert 15 <= flagged.sum() < 300
    _assert_explanations(resp, model, X, 2, flagged)
    planted = np.flatnonzero(np.abs(X[:, list(PLANTED)]).min(axis=1) > 4)
    by_record = {e.record: set(e.features) for e in resp.explanations}
    shown = [r for r in planted if r in by_record]
    assert len(shown) >= len(planted) // 2  # most planted records are flagged, hence explained
    # over 200 seeds, at worst: 77% of the planted records shown, 64% of those with top-2 == PLANTED
    assert np.mean([by_record[r] == set(PLANTED) for r in shown]) >= 0.5


def test_top_k_zero_means_three_and_no_explain_means_none(stub, model, rng):
    X = _records(rng, 20, 2)
    resp = stub.Score(_explain_request(X, top_k=0), timeout=TIMEOUT)
    _assert_explanations(resp, model, X, 3, np.ones(20, dtype=bool))
    assert all(len(e.features) == 3 for e in resp.explanations)
    plain = stub.Score(request(X), timeout=TIMEOUT)
    assert len(plain.explanations) == 0 and list(plain.scores) == list(resp.scores)
    empty = stub.Score(_explain_request(X[:0], top_k=2), timeout=TIMEOUT)
    assert len(empty.scores) == 0 and len(empty.explanations) == 0


def test_bad_top_k_is_invalid_argument(server, stub, rng):
    X = _records(rng, 3, 1)
    before = server.sample("outlierd_invalid_inputs_total", {"reason": "explain"})
    with pytest.raises(grpc.RpcError) as info:
        stub.Score(_explain_request(X, top_k=D + 1), timeout=TIMEOUT)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details() == f"explain: top_k must be in [1, {D}] (the model's number of features; 0 means 3); got {D + 1}"
    assert server.sample("outlierd_invalid_inputs_total", {"reason": "explain"}) == before + 1


def test_stream_mixes_explained_plain_and_rejected_messages(stub, model, rng):
    batches = [_records(rng, n, 2) for n in (50, 7, 30, 64)]
    reqs = [_explain_request(batches[0], top_k=3, request_id=0),
            request(batches[1], request_id=1),
            _explain_request(batches[2], top_k=D + 5, request_id=2),
            _explain_request(batches[3], top_k=1, explain_flagged_only=True, request_id=3)]
    responses = list(stub.ScoreStream(iter(reqs), timeout=TIMEOUT))
    assert [r.request_id for r in responses] == [0, 1, 2, 3]
    _assert_explanations(responses[0], model, batches[0], 3, np.ones(50, dtype=bool))
    assert responses[1].error == "" and len(responses[1].explanations) == 0 and len(responses[1].scores) == 7
    assert responses[2].error.startswith("INVALID_ARGUMENT: explain: top_k must be in [1, 8]")
    _assert_explanations(responses[3], model, batches[3], 1, np.asarray(responses[3].anomalous))
