"""Issue 14, training / artifacts / CLI: label-like columns (9), input checks of ``score`` (12), a
floor of training rows per detector (13), forged array shapes (18), and the rough edges of 20
(the cell that is not a number, ``--device cuda`` with numba, escape codes from a file)."""

import io
import json
import zipfile

import numpy as np
import pytest
from conftest import run_cli

from outlierd.core.errors import ArtifactError, InvalidInputError
from outlierd.core.model import load_model
from outlierd.core.registry import Registry
from outlierd.training.spec import TrainSpec

ESC = "\x1b"


def _csv(path, header, rows):
    path.write_text(",".join(header) + "\n" + "\n".join(",".join(str(v) for v in r) for r in rows) + "\n")
    return path


def _normal_rows(n, d=3, seed=0, shift=0.0):
    return (np.random.default_rng(seed).normal(size=(n, d)) + shift).round(4).tolist()


def _train(data, reg, *extra, model="m"):
    return run_cli("train", "--data", str(data), "--registry", str(reg), "--model", model, "--quiet", *map(str, extra))


def _no_model(reg, model="m"):
    return not (reg / model).exists() or not Registry(reg).models()


# ------------------------------------------------------------------------------------------------
# 9: a column named like a label is not trained as a feature by default
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["label", "Is_Anomaly", "TARGET", "class"])
def test_label_like_column_is_refused_without_label_column(tmp_path, name):
    y = (np.arange(200) % 20 == 0).astype(int)
    rows = [[*r, int(v)] for r, v in zip(_normal_rows(200), y)]
    data = _csv(tmp_path / "d.csv", ["a", "b", "c", name], rows)
    res = _train(data, tmp_path / "r")
    assert res.returncode == 2, res.stderr
    assert f"column {name!r} looks like a label" in res.stderr and f"--label-column {name}" in res.stderr
    assert "--feature-columns" in res.stderr and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert _no_model(tmp_path / "r")
    # named as the label column: trained on a, b, c
    res = _train(data, tmp_path / "r", "--label-column", name, "--json")
    assert res.returncode == 0, res.stderr
    assert [f["name"] for f in load_model(json.loads(res.stdout)["path"]).manifest["features"]] == ["a", "b", "c"]


def test_feature_columns_keeps_a_label_like_feature_on_purpose(tmp_path):
    rows = [[*r, i % 7] for i, r in enumerate(_normal_rows(200))]
    data = _csv(tmp_path / "d.csv", ["a", "b", "c", "class"], rows)
    res = _train(data, tmp_path / "r", "--feature-columns", "class,a,b", "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    model = load_model(out["path"])
    assert model.feature_names == ["class", "a", "b"]  # the order given, c left out
    assert model.manifest["lineage"]["parameters"]["feature_columns"] == ["class", "a", "b"]


@pytest.mark.parametrize("options,message", [
    ({"feature_columns": "a,,b"}, "empty column name"),
    ({"feature_columns": ["a", "b", "a"]}, "names ['a'] more than once"),
    ({"feature_columns": "a,label", "label_column": "label"}, "includes the label column 'label'"),
    ({"feature_columns": 3}, "must be column names"),
])
def test_trainspec_validates_feature_columns(tmp_path, options, message):
    with pytest.raises(InvalidInputError, match=message.replace("[", r"\[").replace("]", r"\]")):
        TrainSpec(tmp_path / "d.csv", tmp_path / "r", "m", **options)
    assert TrainSpec(tmp_path / "d.csv", tmp_path / "r", "m", feature_columns=" a , b").feature_columns == ("a", "b")


def test_feature_columns_missing_from_the_data(tmp_path):
    data = _csv(tmp_path / "d.csv", ["a", "b"], _normal_rows(100, 2))
    res = _train(data, tmp_path / "r", "--feature-columns", "a,zz")
    assert res.returncode == 2 and "['zz'] are missing" in res.stderr


# ------------------------------------------------------------------------------------------------
# 13: a floor of training rows per detector
# ------------------------------------------------------------------------------------------------


def test_three_rows_publish_nothing(tmp_path):
    data = _csv(tmp_path / "d.csv", ["a", "b"], [[1, 2], [2, 3], [3, 5]])
    res = _train(data, tmp_path / "r")
    assert res.returncode == 2, res.stderr
    assert "3 rows to fit iforest on; iforest needs at least 32" in res.stderr and "Traceback" not in res.stderr
    assert _no_model(tmp_path / "r")


@pytest.mark.parametrize("detector", ["iforest", "hbos", "robust_z", "knn", "lof"])
def test_each_detector_has_its_floor(tmp_path, detector):
    from outlierd.training.detectors import min_fit_rows

    need = min_fit_rows(detector)
    data = _csv(tmp_path / "few.csv", ["a", "b"], _normal_rows(need - 1, 2))
    res = _train(data, tmp_path / "r", "--detector", detector)
    assert res.returncode == 2, res.stderr
    assert f"{need - 1} rows to fit {detector} on; {detector} needs at least {need}" in res.stderr
    data = _csv(tmp_path / "enough.csv", ["a", "b"], _normal_rows(need, 2))
    res = _train(data, tmp_path / "r", "--detector", detector)
    assert res.returncode == 0, res.stderr


def test_floors_are_what_the_detectors_need():
    from outlierd.training.detectors import MIN_FIT_ROWS, min_fit_rows

    assert MIN_FIT_ROWS["knn"] > 20 and MIN_FIT_ROWS["lof"] > 20  # more than k = 20 neighbours
    assert MIN_FIT_ROWS["iforest"] >= 32 and MIN_FIT_ROWS["hbos"] >= 32
    assert min_fit_rows("iforest_1024") == MIN_FIT_ROWS["iforest"]


def test_floor_counts_the_rows_left_once_known_anomalies_are_removed(tmp_path):
    # 40 rows, 12 reviewers' anomalies, the rest unlabelled: 28 rows to fit
    labels = ["1"] * 12 + [""] * 28
    rows = [[*r, v] for r, v in zip(_normal_rows(40, 2), labels)]
    data = _csv(tmp_path / "d.csv", ["a", "b", "y"], rows)
    res = _train(data, tmp_path / "r", "--label-column", "y")
    assert res.returncode == 2, res.stderr
    assert "28 rows left once the known anomalies are removed to fit iforest on; iforest needs at least 32" in res.stderr


# ------------------------------------------------------------------------------------------------
# 12: score checks its input against the model
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_registry(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("score")
    data = _csv(tmp / "train.csv", ["a", "b", "c", "label"],
                [[*r, 0] for r in _normal_rows(2000, seed=1)])
    res = _train(data, tmp / "r", "--label-column", "label", "--alias", "champion", "--alert-rate", "0.02")
    assert res.returncode == 0, res.stderr
    return tmp


def _score(reg, data, *extra):
    return run_cli("score", "--data", str(data), "--registry", str(reg), "--model", "m", "--quiet", *extra)


def test_score_on_the_wrong_data_warns(small_registry, tmp_path):
    rows = [[*r, *extra] for r, extra in zip(_normal_rows(1000, seed=2, shift=40.0), _normal_rows(1000, 2, seed=3))]
    data = _csv(tmp_path / "wrong.csv", ["a", "b", "c", "x7", "x8"], rows)
    res = _score(small_registry / "r", data, "--json")
    assert res.returncode == 0, res.stderr
    warnings = json.loads(res.stdout)["warnings"]
    assert len(warnings) == 3, warnings
    cols, far, rate = warnings
    assert "2 input column(s) are not features of the model and were ignored: 'x7', 'x8'" in cols
    assert "3 feature(s) have values far outside their training range" in far and "'a' 100.0% of values" in far
    assert "alert rate 100.00% (1000 of 1000 records) is more than 5x" in rate and "(2.00%)" in rate
    for w in warnings:
        assert f"warning: {w}" in res.stderr
    # the plain summary warns as well
    res = _score(small_registry / "r", data)
    assert res.returncode == 0 and res.stderr.count("warning: ") == 3


def test_score_on_the_right_data_is_quiet(small_registry, tmp_path):
    # the training label column beside the features is expected, not "ignored"
    data = _csv(tmp_path / "right.csv", ["a", "b", "c", "label"], [[*r, 0] for r in _normal_rows(3000, seed=4)])
    res = _score(small_registry / "r", data, "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["warnings"] == [] and "warning" not in res.stderr


def test_score_warns_when_the_alert_rate_collapses(small_registry, tmp_path):
    # every value at the training median: nothing is flagged where 2% were expected
    data = _csv(tmp_path / "flat.csv", ["a", "b", "c"], [[0.0, 0.0, 0.0]] * 1000)
    res = _score(small_registry / "r", data, "--json")
    warnings = json.loads(res.stdout)["warnings"]
    assert len(warnings) == 1 and "alert rate 0.00% (0 of 1000 records) is less than 1/5 of" in warnings[0]


def test_input_check_units():
    from outlierd.training.input_check import InputCheck, calibrated_alert_rate

    ref = {"features": [{"name": "a", "min": 0.0, "max": 1.0}, {"name": "b", "min": 5.0, "max": 5.0}, {"name": "c"}]}
    check = InputCheck.from_reference(ref, ["a", "b", "c"])
    X = np.array([[2.5, 5.0, 1e9], [-1.5, 11.0, 0.0], [0.5, np.nan, 0.0], [1.9, 9.9, 0.0]])
    for lo in range(0, 4, 2):  # batch by batch
        check.observe(X[lo:lo + 2])
    assert check.far.tolist() == [2, 1, 0] and check.finite.tolist() == [4, 3, 4]
    assert [f[0] for f in check.far_features()] == ["a", "b"]
    assert calibrated_alert_rate({"alert_rate": 0.01}) == 0.01
    assert calibrated_alert_rate({"alert_rate": 0.01}, {"method": "alert_rate", "target": 0.05}) == 0.05
    assert calibrated_alert_rate({"alert_rate": 0.01}, {"method": "precision", "estimated_alert_rate": None}) is None


# ------------------------------------------------------------------------------------------------
# 18: an arrays.npz whose header claims a huge shape
# ------------------------------------------------------------------------------------------------


def _forge_shape(npz, name, shape):
    """Rewrite the header of member ``name`` of ``npz`` to claim ``shape`` (its bytes unchanged)."""
    from numpy.lib import format as npformat

    with zipfile.ZipFile(npz) as z:
        members = {info.filename: z.read(info) for info in z.infolist()}
    buf = io.BytesIO(members[name + ".npy"])
    version = npformat.read_magic(buf)
    read = npformat.read_array_header_1_0 if version == (1, 0) else npformat.read_array_header_2_0
    _, _, dtype = read(buf)
    body = members[name + ".npy"][buf.tell():]
    header = io.BytesIO()
    npformat.write_array_header_1_0(header, {"descr": npformat.dtype_to_descr(dtype), "fortran_order": False, "shape": shape})
    members[name + ".npy"] = header.getvalue() + body
    with zipfile.ZipFile(npz, "w") as z:
        for k, v in members.items():
            z.writestr(k, v)


def test_forged_huge_shape_is_refused_before_allocating(small_registry, tmp_path):
    import shutil

    from outlierd.core.artifact import manifest_digest, sha256_file

    reg = tmp_path / "r"
    shutil.copytree(small_registry / "r", reg)
    art = Registry(reg).path("m", 1)
    npz = art / "arrays.npz"
    _forge_shape(npz, "if_feature", (10**6, 10**6))
    # a deliberate forger re-signs the manifest
    m = json.loads((art / "manifest.json").read_text())
    m["files"]["arrays.npz"] = {"sha256": sha256_file(npz), "bytes": npz.stat().st_size}
    m["manifest_sha256"] = manifest_digest(m)
    (art / "manifest.json").write_text(json.dumps(m))
    size = npz.stat().st_size
    with pytest.raises(ArtifactError, match=r"array 'if_feature' claims shape \(1000000, 1000000\)") as e:
        load_model(art)
    assert f"the file is {size:,} bytes" in str(e.value)
    data = _csv(tmp_path / "d.csv", ["a", "b", "c"], _normal_rows(10))
    res = _score(reg, data)
    assert res.returncode == 2 and "claims shape (1000000, 1000000)" in res.stderr
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_honest_arrays_pass_the_shape_check(small_registry):
    from outlierd.core.artifact import check_npz_shapes

    art = Registry(small_registry / "r").path("m", 1)
    check_npz_shapes(art / "arrays.npz")
    check_npz_shapes(art / "probe.npz")


def test_compressed_npz_is_checked_against_its_compressed_size(tmp_path):
    from outlierd.core.artifact import check_npz_shapes, load_npz

    path = tmp_path / "z.npz"
    np.savez_compressed(path, x=np.zeros((1000, 100)))
    assert load_npz(path)["x"].shape == (1000, 100)  # 800 kB of zeros in a few kB: within deflate's ratio
    _forge_shape(path, "x", (10**5, 10**5))
    with pytest.raises(ArtifactError, match="claims shape"):
        check_npz_shapes(path)


# ------------------------------------------------------------------------------------------------
# 20: the cell that is not a number, --device cuda with numba, escape codes from the file
# ------------------------------------------------------------------------------------------------


def test_question_mark_cell_names_its_row_and_text(small_registry, tmp_path):
    rows = _normal_rows(100)
    rows[41][1] = "?"
    data = _csv(tmp_path / "q.csv", ["a", "b", "c"], rows)
    for res in (_train(data, tmp_path / "r2"), _score(small_registry / "r", data)):
        assert res.returncode == 2
        assert "column 'b' has type string" in res.stderr
        assert "row 42 (counting from 1 after the header) holds '?', which is not a number" in res.stderr


def test_long_cell_text_is_truncated(tmp_path):
    rows = _normal_rows(100)
    rows[3][0] = "z" * 500
    res = _train(_csv(tmp_path / "q.csv", ["a", "b", "c"], rows), tmp_path / "r")
    assert res.returncode == 2 and "row 4 " in res.stderr and "z" * 40 + "…'" in res.stderr and "z" * 41 not in res.stderr


def test_escape_codes_from_the_file_are_not_echoed_raw(small_registry, tmp_path):
    evil = f"{ESC}[2J{ESC}[31mEVIL{ESC}[0m"
    rows = _normal_rows(100)
    rows[9][2] = evil
    cell = _csv(tmp_path / "cell.csv", ["a", "b", "c"], rows)
    lines = (tmp_path / "cell.csv").read_text().splitlines()
    lines[20] += "," + evil  # a row with one cell too many: pyarrow's parse error quotes the line
    (tmp_path / "parse.csv").write_text("\n".join(lines).replace(evil, "1.0", 1) + "\n")
    for data in (cell, tmp_path / "parse.csv"):
        for res in (_train(data, tmp_path / "r2"), _score(small_registry / "r", data)):
            assert res.returncode == 2, res.stderr
            assert ESC not in res.stderr and "\\x1b[31mEVIL\\x1b[0m" in res.stderr, res.stderr


def test_device_cuda_with_numba_names_the_flag(small_registry, tmp_path):
    data = _csv(tmp_path / "d.csv", ["a", "b", "c"], _normal_rows(10))
    res = _score(small_registry / "r", data, "--device", "cuda")
    assert res.returncode == 2
    assert "use --backend cuda, onnx or torch" in res.stderr and "backend='onnx'" not in res.stderr
