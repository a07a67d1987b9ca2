"""kNN distance and LOF against a stored reference sample: the Numba kernel and the torch (GEMM)
path against scikit-learn's NearestNeighbors / LocalOutlierFactor(novelty=True)."""

import json

import numpy as np
import pytest
from conftest import dataset_path, load_csv
from sklearn.neighbors import LocalOutlierFactor, NearestNeighbors

import outlierd.core.backends
import outlierd.core.knn
from outlierd.core import load_model
from outlierd.core.errors import ArtifactError, InvalidInputError
from outlierd.core.model import build_model
from outlierd.core.preprocess import Preprocessing
from outlierd.cli import main
from outlierd.training.detectors import fit_knn, fit_lof
from outlierd.training.export import export_detector

FIT = {"knn": fit_knn, "lof": fit_lof}


def _oracle(kind, ref, k, Xp):
    if kind == "knn":
        return NearestNeighbors(n_neighbors=k).fit(ref).kneighbors(Xp)[0][:, -1]
    return -LocalOutlierFactor(n_neighbors=k, novelty=True).fit(ref).score_samples(Xp)


def _prep(rng, X, scaled=True, missing="impute"):
    d = X.shape[1]
    median = np.median(X, axis=0)
    if not scaled:
        return Preprocessing.identity(d, median=median, missing=missing)
    return Preprocessing(median, X.mean(axis=0), 1.0 / rng.uniform(0.5, 2.0, size=d), missing)


def _train(tmp_path, kind, X, prep, **kw):
    spec, arrays = FIT[kind](prep.transform(X), **kw)
    names = [f"f{i}" for i in range(X.shape[1])]
    path = export_detector(tmp_path / kind, detector=spec, arrays=arrays, prep=prep, feature_names=names,
                           threshold=1.0, X_train=X)
    return path, spec, arrays


@pytest.mark.parametrize("kind", ["knn", "lof"])
@pytest.mark.parametrize("n,d,k,max_ref", [(300, 4, 7, 4096), (500, 9, 20, 200), (40, 2, 1, 4096)])
def test_matches_sklearn_on_random_data(tmp_path, rng, kind, n, d, k, max_ref):
    X = rng.normal(size=(n, d)) * rng.uniform(0.1, 10, size=d)
    prep = _prep(rng, X)
    path, spec, arrays = _train(tmp_path, kind, X, prep, k=k, seed=int(rng.integers(1 << 30)), max_reference=max_ref)
    ref = arrays["nn_ref"]
    assert ref.dtype == np.float64 and ref.shape == (min(n, max_ref), d)
    assert spec["params"]["k"] == k and spec["params"]["reference_rows"] == ref.shape[0]
    Xq = np.vstack([X[:50], rng.normal(size=(150, d)) * 3 * X.std(axis=0)])
    model = load_model(path)
    assert model.backend == "numba"
    np.testing.assert_allclose(model.score(Xq), _oracle(kind, ref, k, prep.transform(Xq)), rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["knn", "lof"])
def test_matches_sklearn_on_a_dataset(tmp_path, rng, kind):
    X, y = load_csv("cardio")
    prep = _prep(rng, X, scaled=False)
    path, spec, arrays = _train(tmp_path, kind, X, prep, k=20, max_reference=1024)
    ref = arrays["nn_ref"]
    assert ref.shape == (1024, X.shape[1])
    model = load_model(path)
    # the whole dataset: half of it is in the reference sample (a neighbour at distance 0)
    np.testing.assert_allclose(model.score(X), _oracle(kind, ref, 20, prep.transform(X)), rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["knn", "lof"])
def test_torch_backend_equals_numba(tmp_path, rng, kind, monkeypatch):
    pytest.importorskip("torch")
    X = rng.normal(size=(400, 6))
    path, _, arrays = _train(tmp_path, kind, X, _prep(rng, X), k=10)
    numba_model = load_model(path)
    torch_model = load_model(path, backend="torch", device="cpu")  # the probe holds at 1e-9 too
    assert (torch_model.backend, torch_model.device) == ("torch", "cpu")
    Xq = rng.normal(size=(700, 6)) * 2
    Xq[::7, 2] = np.nan
    want = numba_model.score(Xq)
    np.testing.assert_allclose(torch_model.score(Xq), want, rtol=0, atol=1e-6)
    # chunked GEMM: several chunks of a few rows each
    monkeypatch.setattr(outlierd.core.knn, "CHUNK_ELEMENTS", 13 * arrays["nn_ref"].shape[0])
    chunked = load_model(path, backend="torch", device="cpu")
    np.testing.assert_allclose(chunked.score(Xq), want, rtol=0, atol=1e-6)
    assert torch_model.score(np.empty((0, 6))).shape == (0,)


@pytest.mark.parametrize("kind", ["knn", "lof"])
def test_serial_and_parallel_paths_agree(tmp_path, rng, kind, monkeypatch):
    X = rng.normal(size=(300, 5))
    path, _, arrays = _train(tmp_path, kind, X, _prep(rng, X), k=15)
    model = load_model(path)
    Xq = rng.normal(size=(1000, 5)) * 2  # several blocks of 64, and a ragged last block
    got = {}
    for cutoff in (0, 10**9):
        monkeypatch.setattr(outlierd.core.backends, "SERIAL_MAX_ROWS", cutoff)
        got[cutoff] = model.score(Xq)
    np.testing.assert_array_equal(got[0], got[10**9])
    np.testing.assert_array_equal(model.score(Xq, parallel=True), model.score(Xq, parallel=False))
    np.testing.assert_array_equal(model.score(Xq[:1]), got[0][:1])


@pytest.mark.parametrize("kind", ["knn", "lof"])
def test_missing_values_are_imputed_or_rejected(tmp_path, rng, kind):
    X = rng.normal(size=(200, 4))
    prep = _prep(rng, X)
    path, _, arrays = _train(tmp_path, kind, X, prep, k=5)
    model = load_model(path)
    Xq = rng.normal(size=(100, 4))
    Xq[rng.random(Xq.shape) < 0.2] = np.nan
    Xq[3] = np.nan
    imputed = np.where(np.isnan(Xq), prep.median, Xq)
    got = model.score(Xq)
    assert np.all(np.isfinite(got))
    np.testing.assert_array_equal(got, model.score(imputed))
    np.testing.assert_allclose(got, _oracle(kind, arrays["nn_ref"], 5, prep.transform(Xq)), rtol=0, atol=1e-6)
    Xinf = Xq.copy()
    Xinf[0, 0], Xinf[1, 1] = np.inf, -np.inf
    s = model.score(Xinf)
    assert np.all(np.isfinite(s)) and s[0] > np.median(s) and s[1] > np.median(s)

    rprep = Preprocessing(prep.median, prep.center, prep.scale_inv, "reject")
    rpath, _, _ = _train(tmp_path / "reject", kind, X, rprep, k=5)
    strict = load_model(rpath)
    Xr = imputed[:10].copy()
    Xr[3, 1] = np.nan
    with pytest.raises(InvalidInputError, match="record 3"):
        strict.score(Xr)
    np.testing.assert_array_equal(strict.score(imputed), got)


def test_k_is_capped_by_the_reference_size(rng):
    X = rng.normal(size=(6, 3))
    spec, arrays = fit_knn(X, k=20)
    assert spec["params"]["k"] == 6 and spec["params"]["k_requested"] == 20
    spec, arrays = fit_lof(X, k=20)
    assert spec["params"]["k"] == 5  # as LocalOutlierFactor: n_neighbors <= n - 1
    prep = Preprocessing.identity(3)
    manifest = {"detector": spec, "features": [{"name": c} for c in "abc"], "threshold": 1.0, "preprocessing": prep.manifest()}
    model = build_model(manifest, {**prep.arrays(), **arrays})
    Xq = rng.normal(size=(10, 3))
    with pytest.warns(UserWarning):
        want = -LocalOutlierFactor(n_neighbors=20, novelty=True).fit(X).score_samples(Xq)
    np.testing.assert_allclose(model.score(Xq), want, rtol=0, atol=1e-6)


def test_reference_is_a_seeded_sample(rng):
    X = rng.normal(size=(500, 3))
    a = fit_knn(X, seed=1, max_reference=100)[1]["nn_ref"]
    b = fit_knn(X, seed=1, max_reference=100)[1]["nn_ref"]
    c = fit_knn(X, seed=2, max_reference=100)[1]["nn_ref"]
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert all(any(np.array_equal(r, x) for x in X) for r in a[:5])


def test_bad_arrays_are_refused(rng):
    X = rng.normal(size=(50, 3))
    spec, arrays = fit_lof(X, k=5)
    prep = Preprocessing.identity(3)
    manifest = {"detector": spec, "features": [{"name": c} for c in "abc"], "threshold": 1.0, "preprocessing": prep.manifest()}
    for broken in ({k: v for k, v in arrays.items() if k != "nn_lrd"},
                   {**arrays, "nn_ref": arrays["nn_ref"][:, :2]},
                   {**arrays, "nn_lrd": -arrays["nn_lrd"]}):
        with pytest.raises(ArtifactError):
            build_model(manifest, {**prep.arrays(), **broken})
    bad_k = {**manifest, "detector": {**spec, "params": {**spec["params"], "k": 51}}}
    with pytest.raises(ArtifactError, match="k must be"):
        build_model(bad_k, {**prep.arrays(), **arrays})


def test_cli_train_knn_and_lof_end_to_end(tmp_path, capsys):
    data = dataset_path("cardio")
    reg = tmp_path / "reg"
    aucs = {}
    for detector in ("knn", "lof"):
        rc = main(["train", "--data", str(data), "--registry", str(reg), "--model", detector, "--detector", detector,
                   "--label-column", "label", "--json", "--quiet"])
        out, err = capsys.readouterr()
        assert rc == 0, err
        res = json.loads(out)
        aucs[detector] = res["metrics"]["roc_auc"]
        model = load_model(res["path"])
        assert model.kind == detector and model.manifest["detector"]["params"]["k"] == 20
        assert model.manifest["detector"]["params"]["reference_rows"] == 1831
    # k = 20 on cardio: 0.788 for the k-th neighbour distance (scikit-learn gives the same), and LOF
    # is weak on this dataset (0.55; ~0.59 in PyOD's benchmark)
    assert aucs["knn"] > 0.75, aucs
    assert aucs["lof"] > 0.5, aucs
