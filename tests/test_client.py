"""The Python client's streams carry ids and ask for explanations (issue 14, the README list:
``ScorerClient.score_stream`` could send neither, which the feedback loop needs)."""

from __future__ import annotations

import numpy as np
from conftest import small_server

from outlierd.server.client import ScorerClient


def test_score_stream_with_ids_and_explanations(tmp_path, rng):
    with small_server(tmp_path, d=5, capture=0) as (worker, _):
        model = worker.slot.current.model  # the loaded artifact the server scores with
        X = (rng.standard_normal((30, 5)) * 2).astype(np.float32)
        batches = [(X[i:i + 10], [f"r{j}" for j in range(i, i + 10)]) for i in range(0, 30, 10)]
        with ScorerClient(f"127.0.0.1:{worker.port}") as client:
            got = list(client.score_stream(batches, explain=True, top_k=2))
            plain = list(client.score_stream([X[:10]]))  # bare arrays still work
            one = client.score(X[:10], ids=[f"r{j}" for j in range(10)], explain=True, top_k=2)
    assert [g.ids for g in got] == [ids for _, ids in batches] and not any(g.error for g in got)
    scores, features, contributions = model.score_explain(X, 2, False)
    np.testing.assert_allclose(np.concatenate([g.scores for g in got]), scores, atol=1e-9)
    explained = [e for k, g in enumerate(got) for e in g.explanations]
    assert [10 * (k // 10) + e.record for k, e in zip(range(30), explained)] == list(range(30))
    assert [e.features for e in explained] == features.tolist()
    np.testing.assert_allclose([e.contributions for e in explained], contributions, atol=1e-9)
    assert explained[0].feature_names == [model.feature_names[j] for j in features[0]]
    assert plain[0].ids == [] and plain[0].explanations == [] and len(plain[0].scores) == 10
    assert one.ids == [f"r{j}" for j in range(10)] and [e.features for e in one.explanations] == features[:10].tolist()
