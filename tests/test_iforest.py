"""Isolation Forest: the artifact's scores equal -IsolationForest.score_samples (and a naive walk)."""

import numpy as np
import pytest
from conftest import load_csv
from sklearn.ensemble import IsolationForest

import outlierd.core.backends
from outlierd.core import InvalidInputError, load_model
from outlierd.training import export_sklearn

import naive


def _export(tmp_path, forest, **kw):
    return load_model(export_sklearn(forest, tmp_path / "model", **kw))


@pytest.mark.parametrize(
    "n_train,d,params",
    [
        (300, 1, {}),
        (1000, 5, {}),
        (2000, 32, {}),
        (500, 300, {"n_estimators": 20}),  # > 256 features: uint16 feature indices
        (100, 4, {"max_samples": 30}),
        (3000, 8, {"max_features": 0.5, "n_estimators": 50}),
        (2000, 6, {"max_samples": 1.0, "n_estimators": 10}),  # deep trees
        (800, 3, {"bootstrap": True}),
    ],
)
def test_scores_equal_sklearn(tmp_path, rng, n_train, d, params):
    X = rng.normal(size=(n_train, d)) * rng.uniform(0.1, 100, size=d) + rng.normal(size=d) * 10
    forest = IsolationForest(random_state=int(rng.integers(1 << 31)), **params).fit(X)
    model = _export(tmp_path, forest)
    for n in (0, 1, 7, 64, 65, 1500):
        Xt = np.concatenate([X[rng.integers(0, n_train, size=n // 2)], rng.normal(size=(n - n // 2, d)) * 50])
        ref = -forest.score_samples(Xt) if n else np.empty(0)
        np.testing.assert_allclose(model.score(Xt), ref, rtol=0, atol=1e-6)
        np.testing.assert_allclose(model.score(Xt.astype(np.float32)), ref, rtol=0, atol=1e-5)
    assert model.n_features == d and model.threshold == pytest.approx(-forest.offset_)


def test_naive_oracle_agrees(tmp_path, rng):
    X = rng.normal(size=(500, 4))
    forest = IsolationForest(n_estimators=15, random_state=1).fit(X)
    Xt = rng.normal(size=(40, 4)) * 3
    np.testing.assert_allclose(_export(tmp_path, forest).score(Xt), naive.iforest(forest, Xt), atol=1e-12)


def test_thresholds_at_float32_ties(tmp_path, rng):
    # values sitting exactly on float32-rounded split points must go the same way as in sklearn
    X = rng.normal(size=(1000, 3))
    forest = IsolationForest(n_estimators=30, random_state=0).fit(X)
    thr = np.concatenate([e.tree_.threshold[e.tree_.children_left >= 0] for e in forest.estimators_])
    vals = np.concatenate([thr.astype(np.float32), np.nextafter(thr.astype(np.float32), np.float32(np.inf))])
    Xt = np.repeat(vals[:, None], 3, axis=1)
    np.testing.assert_allclose(_export(tmp_path, forest).score(Xt), -forest.score_samples(Xt), atol=1e-12)


@pytest.mark.parametrize("name", ["cardio", "satellite", "mammography", "shuttle"])
def test_datasets_equal_sklearn(tmp_path, name):
    X, _ = load_csv(name)
    forest = IsolationForest(random_state=0).fit(X)
    model = _export(tmp_path, forest, X_train=X)
    np.testing.assert_allclose(model.score(X), -forest.score_samples(X), atol=1e-6)
    np.testing.assert_allclose(model.score(X.astype(np.float32)), -forest.score_samples(X), atol=1e-5)


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(1000, 5))
    forest = IsolationForest(n_estimators=50, random_state=0).fit(X)
    return load_model(export_sklearn(forest, tmp_path_factory.mktemp("m") / "model", X_train=X)), forest, X


def test_serial_and_parallel_paths_agree(small_model, rng, monkeypatch):
    model, forest, _ = small_model
    Xt = rng.normal(size=(3001, 5))
    ref = -forest.score_samples(Xt)
    for cutoff in (0, 1, 10**9):  # force the parallel kernel, then the serial one, on the same rows
        monkeypatch.setattr(outlierd.core.backends, "SERIAL_MAX_ROWS", cutoff)
        np.testing.assert_allclose(model.score(Xt), ref, atol=1e-12)
        np.testing.assert_allclose(model.score(Xt[:3]), ref[:3], atol=1e-12)


def test_nan_is_imputed_with_training_median(small_model, rng):
    model, forest, X = small_model
    Xt = rng.normal(size=(50, 5))
    mask = rng.random(Xt.shape) < 0.3
    Xnan = np.where(mask, np.nan, Xt)
    imputed = np.where(mask, np.median(X, axis=0), Xt)
    s = model.score(Xnan)
    assert np.all(np.isfinite(s))
    np.testing.assert_allclose(s, -forest.score_samples(imputed), atol=1e-12)


def test_inf_scores_like_a_huge_value_never_nan(small_model):
    model, forest, _ = small_model
    Xt = np.zeros((4, 5))
    Xt[0, 0], Xt[1, 1], Xt[2, :] = np.inf, -np.inf, np.inf
    huge = np.clip(Xt, -3e38, 3e38)
    s = model.score(Xt)
    assert np.all(np.isfinite(s))
    np.testing.assert_allclose(s, -forest.score_samples(huge), atol=1e-12)


def test_reject_policy_names_the_record(tmp_path, rng):
    X = rng.normal(size=(300, 3))
    forest = IsolationForest(n_estimators=10, random_state=0).fit(X)
    model = _export(tmp_path, forest, missing="reject")
    Xt = rng.normal(size=(2000, 3))
    Xt[1234, 2] = np.nan
    with pytest.raises(InvalidInputError, match="record 1234"):
        model.score(Xt)
    with pytest.raises(InvalidInputError, match="record 0"):
        model.score(np.array([[np.inf, 0.0, 0.0]]))
    np.testing.assert_allclose(model.score(Xt[:1000]), -forest.score_samples(Xt[:1000]), atol=1e-12)


def test_one_and_zero_rows(small_model):
    model, forest, X = small_model
    assert model.score(np.empty((0, 5))).shape == (0,)
    assert model.predict(np.empty((0, 5), dtype=np.float32)).shape == (0,)
    one = model.score(X[:1])
    assert one.shape == (1,) and one.dtype == np.float64
    assert one[0] == pytest.approx(-forest.score_samples(X[:1])[0], abs=1e-12)


@pytest.mark.parametrize(
    "bad,match",
    [
        (np.zeros(5), r"2-D .* got shape \(5,\)"),
        (np.zeros((2, 5, 1)), r"2-D"),
        (np.zeros((3, 4)), r"4 features per record; this model expects 5"),
        (np.array([["a", "b", "c", "d", "e"]]), r"numeric .* got dtype <U1"),
        ([[1, 2], [3]], r"numeric"),
    ],
)
def test_bad_input_is_a_clear_value_error(small_model, bad, match):
    model, _, _ = small_model
    with pytest.raises(ValueError, match=match):
        model.score(bad)


def test_other_numeric_layouts_are_accepted(small_model, rng):
    model, forest, _ = small_model
    Xt = rng.normal(size=(100, 10))[:, ::2]  # non-contiguous view
    ref = -forest.score_samples(Xt)
    np.testing.assert_allclose(model.score(Xt), ref, atol=1e-12)
    np.testing.assert_allclose(model.score(np.asfortranarray(Xt)), ref, atol=1e-12)
    Xi = rng.integers(-3, 3, size=(20, 5))
    np.testing.assert_allclose(model.score(Xi), -forest.score_samples(Xi.astype(float)), atol=1e-12)
    np.testing.assert_allclose(model.score(Xt.tolist()), ref, atol=1e-12)


def test_predict_uses_threshold(small_model, rng):
    model, _, _ = small_model
    Xt = rng.normal(size=(500, 5)) * 2
    assert np.array_equal(model.predict(Xt), model.score(Xt) >= model.threshold)
