"""The artifact refuses to load when anything about it is off, with a message that says what."""

import json
import shutil

import numpy as np
import pytest
from sklearn.ensemble import IsolationForest

from outlierd.core import ArtifactError, load_model
from outlierd.core.artifact import FORMAT_VERSION, manifest_digest, rewrite_manifest, sha256_file
from outlierd.training import export_sklearn


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    rng = np.random.default_rng(3)
    X = rng.normal(size=(600, 4))
    forest = IsolationForest(n_estimators=20, random_state=0).fit(X)
    return export_sklearn(forest, tmp_path_factory.mktemp("a") / "model", feature_names=list("abcd"), X_train=X), forest


@pytest.fixture
def copy(artifact, tmp_path):
    return shutil.copytree(artifact[0], tmp_path / "copy")


def _manifest(path):
    return json.loads((path / "manifest.json").read_text())


def _write_manifest(path, m, resign=False):
    if resign:
        m["manifest_sha256"] = manifest_digest(m)
    (path / "manifest.json").write_text(json.dumps(m))


def _resign_arrays(path):
    """Record the rewritten arrays.npz in the manifest and re-sign it, as a deliberate forger would."""
    m = _manifest(path)
    m["files"]["arrays.npz"] = {"sha256": sha256_file(path / "arrays.npz"), "bytes": (path / "arrays.npz").stat().st_size}
    _write_manifest(path, m, resign=True)


def test_layout_and_contents(artifact):
    path, forest = artifact
    assert sorted(p.name for p in path.iterdir()) == ["arrays.npz", "manifest.json", "probe.npz", "reference.json"]
    m = _manifest(path)
    assert m["format_version"] == FORMAT_VERSION and m["detector"]["kind"] == "iforest"
    assert [f["name"] for f in m["features"]] == list("abcd")
    assert m["threshold"] == pytest.approx(-forest.offset_)
    assert m["files"]["arrays.npz"]["sha256"] == sha256_file(path / "arrays.npz")
    assert m["lineage"]["libraries"]["scikit-learn"]
    ref = json.loads((path / "reference.json").read_text())
    assert [f["name"] for f in ref["features"]] == list("abcd")
    assert all(abs(sum(f["proportions"]) - 1) < 1e-9 for f in ref["features"])
    model = load_model(path)
    assert model.feature_names == list("abcd") and model.version is None
    with np.load(path / "arrays.npz", allow_pickle=False) as z:
        assert z["if_threshold"].dtype == np.float32 and z["if_feature"].dtype == np.uint8


def test_corrupted_array_is_refused(copy):
    data = bytearray((copy / "arrays.npz").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / "arrays.npz").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="arrays.npz is corrupt"):
        load_model(copy)


def test_missing_file_is_refused(copy):
    (copy / "probe.npz").unlink()
    with pytest.raises(ArtifactError, match="probe.npz is missing"):
        load_model(copy)


def test_edited_manifest_is_refused(copy):
    m = _manifest(copy)
    m["threshold"] = 0.1
    _write_manifest(copy, m)
    with pytest.raises(ArtifactError, match="modified after it was written"):
        load_model(copy)


def test_manifest_with_nan_or_garbage_is_refused(copy):
    (copy / "manifest.json").write_text(_manifest_text := (copy / "manifest.json").read_text().replace('"threshold": ', '"threshold": NaN, "x": '))
    with pytest.raises(ArtifactError):
        load_model(copy)
    (copy / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        load_model(copy)


def test_newer_format_version_is_refused(copy):
    m = _manifest(copy)
    m["format_version"] = FORMAT_VERSION + 1
    _write_manifest(copy, m, resign=True)
    with pytest.raises(ArtifactError, match=rf"format version {FORMAT_VERSION + 1}, newer than this outlierd reads"):
        load_model(copy)


def test_unknown_detector_is_refused(copy):
    m = _manifest(copy)
    m["detector"]["kind"] = "quantum_forest"
    _write_manifest(copy, m, resign=True)
    with pytest.raises(ArtifactError, match="unknown detector kind 'quantum_forest'"):
        load_model(copy)


def test_tampered_arrays_with_valid_checksums_fail_the_probe(copy):
    # Someone rewrites arrays.npz *and* its checksum: the probe scores still catch it.
    with np.load(copy / "arrays.npz", allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["if_leaf_value"] = arrays["if_leaf_value"] * 1.01
    np.savez(copy / "arrays.npz", **arrays)
    _resign_arrays(copy)
    with pytest.raises(ArtifactError, match="does not reproduce its training-time scores"):
        load_model(copy)


def test_object_arrays_are_never_unpickled(copy):
    np.savez(copy / "arrays.npz", if_feature=np.array([object()], dtype=object))
    _resign_arrays(copy)
    with pytest.raises(ArtifactError, match="cannot read"):
        load_model(copy)


def test_wrong_shapes_are_refused(copy):
    with np.load(copy / "arrays.npz", allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["if_feature"] = arrays["if_feature"][:, :-1]
    np.savez(copy / "arrays.npz", **arrays)
    _resign_arrays(copy)
    with pytest.raises(ArtifactError, match="inconsistent shapes"):
        load_model(copy)


def test_rewrite_manifest_resigns(copy):
    rewrite_manifest(copy, threshold=0.75, metrics={"roc_auc": 0.9})
    model = load_model(copy)
    assert model.threshold == 0.75 and model.metrics == {"roc_auc": 0.9}


def test_not_a_directory(tmp_path):
    with pytest.raises(ArtifactError, match="not a model artifact"):
        load_model(tmp_path / "nothing")
    with pytest.raises(ArtifactError, match="manifest.json is missing"):
        load_model(tmp_path)


def test_existing_destination_is_not_overwritten(artifact):
    path, forest = artifact
    with pytest.raises(ArtifactError, match="already exists"):
        export_sklearn(forest, path)
