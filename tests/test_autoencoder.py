"""The autoencoder: torch training, ONNX export, ONNX Runtime scoring from the artifact."""

import json
import sys

import numpy as np
import pytest
from conftest import dataset_path

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from outlierd.core import load_model  # noqa: E402
from outlierd.core.artifact import ARRAYS, MANIFEST, PROBE, REFERENCE  # noqa: E402
from outlierd.core.autoencoder import MODEL_FILE  # noqa: E402
from outlierd.core.errors import ArtifactError  # noqa: E402
from outlierd.cli import main  # noqa: E402
from outlierd.training.autoencoder import (  # noqa: E402
    PROBE_TOLERANCE,
    TORCH_EXTRA,
    TorchMissingError,
    export_autoencoder,
    fit_autoencoder,
    import_torch,
    layer_sizes,
    standardizing_prep,
)

FAST = {"max_epochs": 40}


def _data(seed=0, n=1000, d=8):
    """Records near a 3-dimensional linear subspace, on very different scales, with a few NaN."""
    rng = np.random.default_rng(seed)
    latent = rng.normal(size=(n, 3))
    X = latent @ rng.normal(size=(3, d)) + 0.05 * rng.normal(size=(n, d))
    X = X * rng.uniform(0.1, 100, size=d) + rng.uniform(-50, 50, size=d)
    X[rng.random(X.shape) < 0.01] = np.nan
    return X, rng


def _export(path, X, fit, prep):
    return export_autoencoder(path, fit, prep, [f"f{i}" for i in range(X.shape[1])], threshold=1.0, X_train=X)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    X, rng = _data()
    X = X[:600]  # the rest: new records from the same distribution (test_planted_outliers_score_higher)
    prep = standardizing_prep(X)
    fit = fit_autoencoder(prep.transform(X), seed=3, **FAST)
    path = _export(tmp_path_factory.mktemp("ae") / "artifact", X, fit, prep)
    return X, rng, prep, fit, path


def test_architecture_and_standardization(trained):
    X, _, prep, fit, _ = trained
    assert layer_sizes(21) == [21, 14, 7, 14, 21] and layer_sizes(8) == [8, 5, 3, 5, 8] and layer_sizes(1) == [1, 2, 2, 2, 1]
    linear = [m for m in fit.module if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linear] == [(8, 5), (5, 3), (3, 5), (5, 8)]
    Xs = prep.transform(X)
    np.testing.assert_allclose(Xs.mean(axis=0), 0, atol=0.05)
    np.testing.assert_allclose(Xs.std(axis=0), 1, atol=0.05)
    p = fit.detector["params"]
    assert fit.detector["kind"] == "autoencoder" and p["seed"] == 3 and 1 <= p["best_epoch"] <= p["epochs"] <= 40
    assert p["validation_rows"] == 60


def test_artifact_scores_equal_the_torch_model(trained):
    X, rng, prep, fit, path = trained
    model = load_model(path)
    assert (model.kind, model.backend, model.device) == ("autoencoder", "onnx", "cpu")
    Xq = np.vstack([X, rng.normal(size=(200, X.shape[1])) * 50])
    Xq[5] = np.nan
    got = model.score(Xq)
    assert got.dtype == np.float64 and np.all(np.isfinite(got)) and np.all(got >= 0)
    want = fit.scores(prep.transform(Xq).astype(np.float32))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # numba (the default) falls back to the native backend; there is no torch scorer
    assert load_model(path, backend="numba").backend == "onnx"
    with pytest.raises(ValueError, match="no 'torch' backend"):
        load_model(path, backend="torch")
    # per-feature squared errors: the graph's second output, averaging to the score
    sq = model._scorer._fn.squared_error(prep.transform(Xq).astype(np.float32))
    assert sq.shape == Xq.shape
    np.testing.assert_allclose(sq.mean(axis=1), got, rtol=1e-5, atol=1e-6)
    # large batches (the parallel probe) and +/-inf stay finite
    Xinf = Xq[:3].copy()
    Xinf[0, 0], Xinf[1, 1] = np.inf, -np.inf
    s = model.score(Xinf)
    assert np.all(np.isfinite(s)) and s[0] > 1e3 and s[1] > 1e3


def test_same_seed_same_scores(trained):
    X, _, prep, fit, _ = trained
    Xs = prep.transform(X)
    again = fit_autoencoder(Xs, seed=3, **FAST)
    np.testing.assert_array_equal(again.scores(Xs), fit.scores(Xs))
    assert again.detector == fit.detector
    other = fit_autoencoder(Xs, seed=4, **FAST)
    assert not np.array_equal(other.scores(Xs), fit.scores(Xs))


def test_planted_outliers_score_higher(trained):
    X, rng, prep, fit, path = trained
    model = load_model(path)
    Xnew = _data()[0][600:]  # records the model never saw, from the training distribution
    planted = rng.choice(400, size=20, replace=False)
    Xnew[planted] += rng.choice([-1, 1], size=(20, X.shape[1])) * 4 * np.nanstd(X, axis=0)
    scores = model.score(Xnew)
    top = np.argsort(-scores)[:20]
    assert len(set(top) & set(planted)) >= 18
    assert np.min(scores[planted]) > np.median(np.delete(scores, planted))


def test_artifact_holds_onnx_and_no_pickle(trained):
    *_, path = trained
    manifest = json.loads((path / MANIFEST).read_text())
    assert set(manifest["files"]) == {ARRAYS, PROBE, REFERENCE, MODEL_FILE}
    assert {k: manifest["probe"][k] for k in PROBE_TOLERANCE} == PROBE_TOLERANCE  # a float32 graph
    assert {p.name for p in path.iterdir()} == {MANIFEST, ARRAYS, PROBE, REFERENCE, MODEL_FILE}
    with np.load(path / ARRAYS, allow_pickle=False) as z:
        assert set(z.files) == {"prep_median", "prep_center", "prep_scale_inv"}
    import onnx

    graph = onnx.load(str(path / MODEL_FILE))
    assert max(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")) == 17
    assert [o.name for o in graph.graph.output] == ["score", "squared_error"]
    assert graph.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch axis
    for p in path.iterdir():
        assert not p.read_bytes().startswith(b"\x80")  # no pickle protocol header anywhere


def test_tampered_onnx_is_refused(trained, tmp_path):
    import shutil

    *_, path = trained
    copy = tmp_path / "copy"
    shutil.copytree(path, copy)
    data = bytearray((copy / MODEL_FILE).read_bytes())
    data[-20] ^= 0xFF
    (copy / MODEL_FILE).write_bytes(bytes(data))
    with pytest.raises(ArtifactError):
        load_model(copy)
    (copy / MODEL_FILE).unlink()
    with pytest.raises(ArtifactError):
        load_model(copy)


def test_missing_torch_says_which_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(TorchMissingError, match=r"pip install 'outlierd\[torch\]'") as e:
        import_torch()
    assert str(e.value) == TORCH_EXTRA
    with pytest.raises(TorchMissingError):
        fit_autoencoder(np.zeros((20, 3)))


def test_cli_train_autoencoder_end_to_end(tmp_path, capsys):
    reg = tmp_path / "reg"
    rc = main(["train", "--data", str(dataset_path("cardio")), "--registry", str(reg), "--model", "ae",
               "--detector", "autoencoder", "--label-column", "label", "--json", "--quiet"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    res = json.loads(out)
    assert res["metrics"]["roc_auc"] > 0.7, res["metrics"]
    model = load_model(res["path"])
    assert model.backend == "onnx" and model.manifest["detector"]["params"]["layers"] == [21, 14, 7, 14, 21]
    assert (model.path / MODEL_FILE).is_file()
