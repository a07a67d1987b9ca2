"""The data plane without any transport: records for a named model in, a ScoreResult out.

A front door (HTTP, a broker consumer) holds a DataPlane and awaits ``plane.score``; these tests do
exactly that, on an event loop of their own, with two models of different widths in one plane.
Scores are compared with the artifact loaded by ``load_model`` (the library path), flags with its
threshold, explanations with ``Model.score_explain``.
"""

from __future__ import annotations

import asyncio
import dataclasses

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from outlierd.core import load_model
from outlierd.core.registry import Registry
from outlierd.monitoring.metrics import ServiceMetrics
from outlierd.server.errors import RequestError
from outlierd.server.plane import DataPlane, ServedModel
from outlierd.server.reload import ModelSlot
from outlierd.server.results import Explain, ScoreResult


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    from sklearn.ensemble import IsolationForest

    from outlierd.training.export import export_sklearn

    root = tmp_path_factory.mktemp("plane")
    rng = np.random.default_rng(7)
    wide = rng.standard_normal((2000, 6))
    reg = Registry(root / "reg")
    forest = IsolationForest(n_estimators=30, random_state=0).fit(wide)
    reg.publish("wide", export_sklearn(forest, root / "wide", X_train=wide, missing="reject"), aliases=("champion",))
    narrow = rng.standard_normal((2000, 3))
    forest = IsolationForest(n_estimators=20, random_state=1).fit(narrow)
    reg.publish("narrow", export_sklearn(forest, root / "narrow", X_train=narrow), aliases=("champion",))
    return reg


def _plane(registry: Registry, metrics=None) -> DataPlane:
    slots = [ModelSlot(registry, name, "champion", metrics) for name in ("wide", "narrow")]
    for slot in slots:
        slot.load_initial()
    return DataPlane([ServedModel(s) for s in slots], threads=2, max_batch=64, max_request_records=500, metrics=metrics)


def _run(plane: DataPlane, coro_fn):
    async def main():
        plane.start()
        try:
            return await coro_fn()
        finally:
            await plane.close()

    return asyncio.run(main())


def test_scores_several_models_by_name_as_the_library_does(registry, rng):
    plane = _plane(registry)
    Xw = rng.standard_normal((300, 6)).astype(np.float32)
    Xn = rng.standard_normal((40, 3)).astype(np.float32)

    async def go():
        # small requests of both models at once: batched per handle, answered per request
        parts = [plane.score("wide", Xw[i:i + 30], ids=[f"w{j}" for j in range(i, i + 30)]) for i in range(0, 300, 30)]
        parts.append(plane.score("narrow", Xn))
        parts.append(plane.score("", Xw[:5]))  # the empty name: the plane's first model
        return await asyncio.gather(*parts)

    results = _run(plane, go)
    assert all(isinstance(r, ScoreResult) for r in results)
    with pytest.raises(dataclasses.FrozenInstanceError):
        results[0].device = "cuda"  # type: ignore[misc]
    wide, narrow = load_model(registry.path("wide", 1)), load_model(registry.path("narrow", 1))
    got = np.concatenate([r.scores for r in results[:10]])
    np.testing.assert_allclose(got, wide.score(Xw), rtol=0, atol=1e-9)
    np.testing.assert_array_equal(np.concatenate([r.flags for r in results[:10]]), wide.score(Xw) >= wide.threshold)
    np.testing.assert_allclose(results[10].scores, narrow.score(Xn), rtol=0, atol=1e-9)
    assert (results[10].model, results[10].version, results[10].alias) == ("narrow", 1, "champion")
    assert results[11].model == "wide" and results[11].scores.shape == (5,)
    assert {r.device for r in results} == {"cpu"}


def test_explanations_equal_the_models(registry, rng):
    plane = _plane(registry)
    X = rng.standard_normal((50, 6)).astype(np.float32) * 3

    async def go():
        return await plane.score("wide", X, explain=Explain(top_k=0, flagged_only=False)), \
            await plane.score("wide", X, explain=Explain(top_k=2, flagged_only=True))

    every, flagged = _run(plane, go)
    model = load_model(registry.path("wide", 1))
    scores, features, contributions = model.score_explain(X, 3, False, threshold=model.threshold)
    np.testing.assert_allclose(every.scores, scores, atol=1e-9)
    np.testing.assert_array_equal(every.explanation[0], features)
    np.testing.assert_allclose(every.explanation[1], contributions, atol=1e-9)
    f2 = flagged.explanation[0]
    assert f2.shape == (50, 2)
    np.testing.assert_array_equal(f2[:, 0] >= 0, flagged.flags)


@pytest.mark.parametrize("call, reason, code, text", [
    (lambda p, X: p.score("nope", X[:, :6]), "unknown_model", "NOT_FOUND", "unknown model 'nope'; this server serves 'wide', 'narrow'"),
    (lambda p, X: p.score("wide", X[:, :4]), "n_features", "INVALID_ARGUMENT", "n_features is 4; model 'wide' version 1 expects 6"),
    (lambda p, X: p.score("wide", X[:, :6], ids=["a"]), "ids", "INVALID_ARGUMENT", "ids has 1 entries for 10 records"),
    (lambda p, X: p.score("wide", np.vstack([X[:, :6]] * 60)), "too_large", "INVALID_ARGUMENT", "request holds 600 records; the limit is 500"),
    (lambda p, X: p.score("wide", np.where(np.arange(6) == 2, np.nan, X[:, :6])), "non_finite", "INVALID_ARGUMENT",
     "record 0 contains NaN or inf and model 'wide' version 1 rejects non-finite values"),
    (lambda p, X: p.score("narrow", X[:, :3], explain=Explain(top_k=4)), "explain", "INVALID_ARGUMENT",
     "explain: top_k must be in [1, 3]"),
])
def test_bad_input_is_a_request_error_naming_it_and_counted(registry, rng, call, reason, code, text):
    metrics = ServiceMetrics(registry=CollectorRegistry())
    plane = _plane(registry, metrics)
    X = rng.standard_normal((10, 8)).astype(np.float32)

    async def go():
        with pytest.raises(RequestError) as e:
            await call(plane, X)
        plane.count_error(e.value)
        ok = await plane.score("wide", X[:, :6])  # the plane goes on serving
        return e.value, ok

    err, ok = _run(plane, go)
    assert (err.reason, err.code) == (reason, code) and str(err).startswith(text), str(err)
    assert metrics.registry.get_sample_value("outlierd_invalid_inputs_total", {"reason": reason}) == 1
    assert ok.scores.shape == (10,)
    assert metrics.registry.get_sample_value("outlierd_records_scored_total", {"model": "wide", "version": "1"}) == 10
