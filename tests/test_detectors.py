"""robust_z and HBOS kernels against the float64 NumPy oracles in naive.py."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import outlierd.core.backends
from outlierd.core import load_model
from outlierd.core.preprocess import Preprocessing
from outlierd.training.detectors import fit_hbos, fit_robust_z
from outlierd.training.export import export_detector

import naive


def _with_edges(rng, X):
    X = X.copy()
    mask = rng.random(X.shape)
    X[mask < 0.05] = np.nan
    X[(mask >= 0.05) & (mask < 0.07)] = np.inf
    X[(mask >= 0.07) & (mask < 0.09)] = -np.inf
    return X


def _train(tmp_path, kind, X, **kw):
    median = np.median(X, axis=0)
    prep = Preprocessing.identity(X.shape[1], median=median)
    spec, arrays = (fit_robust_z if kind == "robust_z" else fit_hbos)(prep.transform(X), **kw)
    names = [f"f{i}" for i in range(X.shape[1])]
    path = export_detector(tmp_path / kind, detector=spec, arrays=arrays, prep=prep, feature_names=names,
                           threshold=1.0, X_train=X)
    return load_model(path), arrays, median


@pytest.mark.parametrize("combine", ["rms", "max"])
@pytest.mark.parametrize("n,d", [(50, 1), (400, 7), (3000, 33)])
def test_robust_z_matches_oracle(tmp_path, rng, combine, n, d, monkeypatch):
    X = rng.standard_t(3, size=(n, d)) * rng.uniform(0.01, 50, size=d)
    X[:, 0] = 4.0  # a constant feature: MAD and mean deviation are 0, scale falls back to 1
    model, arrays, median = _train(tmp_path, "robust_z", X, combine=combine)
    Xt = _with_edges(rng, rng.standard_t(3, size=(2 * n, d)) * 30)
    ref = naive.robust_z(naive.prep(Xt, median), arrays["rz_median"], arrays["rz_scale_inv"], combine)
    for cutoff in (0, 10**9):
        monkeypatch.setattr(outlierd.core.backends, "SERIAL_MAX_ROWS", cutoff)
        got = model.score(Xt)
        assert np.all(np.isfinite(got))
        np.testing.assert_allclose(got, ref, rtol=1e-12)


def test_robust_z_flags_planted_outliers(tmp_path, rng):
    X = rng.normal(size=(2000, 6))
    model, _, _ = _train(tmp_path, "robust_z", X)
    Xt = rng.normal(size=(1000, 6))
    planted = rng.choice(1000, size=20, replace=False)
    Xt[planted, rng.integers(0, 6, size=20)] += rng.choice([-1, 1], size=20) * 12
    top = np.argsort(-model.score(Xt))[:20]
    assert len(set(top) & set(planted)) >= 18


@pytest.mark.parametrize("n,d,bins", [(30, 1, None), (500, 4, 7), (5000, 20, None)])
def test_hbos_matches_oracle(tmp_path, rng, n, d, bins, monkeypatch):
    X = rng.gamma(2.0, size=(n, d)) * rng.uniform(0.1, 10, size=d)
    X[:, -1] = -1.5  # constant feature
    model, arrays, median = _train(tmp_path, "hbos", X, n_bins=bins)
    Xt = _with_edges(rng, np.concatenate([X[: n // 2], rng.gamma(2.0, size=(n, d)) * 20 - 5]))
    Xt[:5] = X[:5]
    Xt[5, :] = arrays["hb_hi"]  # exactly at the training maximum: the last bin
    Xt[6, :] = arrays["hb_lo"]
    ref = naive.hbos(naive.prep(Xt, median), arrays["hb_lo"], arrays["hb_hi"], arrays["hb_inv_width"], arrays["hb_table"])
    for cutoff in (0, 10**9):
        monkeypatch.setattr(outlierd.core.backends, "SERIAL_MAX_ROWS", cutoff)
        got = model.score(Xt)
        assert np.all(np.isfinite(got))
        np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-12)


def test_hbos_flags_planted_outliers(tmp_path, rng):
    X = rng.normal(size=(5000, 5))
    model, _, _ = _train(tmp_path, "hbos", X)
    Xt = rng.normal(size=(1000, 5))
    planted = rng.choice(1000, size=10, replace=False)
    Xt[planted] += 8
    top = np.argsort(-model.score(Xt))[:10]
    assert set(top) == set(planted)


@pytest.fixture(scope="module")
def both_models(tmp_path_factory):
    rng = np.random.default_rng(7)
    X = rng.normal(size=(300, 3))
    tmp = tmp_path_factory.mktemp("det")
    return X, _train(tmp, "robust_z", X), _train(tmp, "hbos", X)


@settings(max_examples=60, deadline=None)
@given(arrays(np.float64, st.tuples(st.integers(0, 70), st.just(3)),
              elements=st.floats(allow_nan=True, allow_infinity=True, width=64)))
def test_any_float_input_gives_finite_or_inf_never_nan(both_models, Xt):
    X, (rz, rz_arrays, med), (hb, hb_arrays, _) = both_models
    Xp = naive.prep(Xt, med) if Xt.size else np.empty((0, 3))
    s_rz, s_hb = rz.score(Xt), hb.score(Xt)
    assert not np.any(np.isnan(s_rz)) and not np.any(np.isnan(s_hb))
    np.testing.assert_allclose(s_rz, naive.robust_z(Xp, rz_arrays["rz_median"], rz_arrays["rz_scale_inv"]), rtol=1e-12)
    np.testing.assert_allclose(s_hb, naive.hbos(Xp, *(hb_arrays[k] for k in ("hb_lo", "hb_hi", "hb_inv_width", "hb_table"))), rtol=1e-12)
