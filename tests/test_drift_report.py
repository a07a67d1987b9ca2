"""`outlierd drift report`: one file against a registry model's reference profile -> HTML + JSON."""

import json
import re

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pytest
from conftest import dataset_path

from core.registry import Registry
from outlierd.cli import main
from training.train import train

ODD = '<b>x0&"</b>'          # a feature name that must be escaped everywhere in the page
SHIFTED = (ODD, "x7")        # +2 std
SCALED = "x10"               # times 3


def _run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _columns(path):
    t = pacsv.read_csv(path)
    return {c: t.column(c).to_numpy().astype(np.float64) for c in t.column_names}


def _write(path, cols):
    pacsv.write_csv(pa.table(cols), path)
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("drift")
    cols = _columns(dataset_path("cardio"))
    cols = {(ODD if c == "x0" else c): v for c, v in cols.items()}
    data = _write(tmp / "cardio.csv", cols)
    reg = tmp / "reg"
    train(data, reg, "cardio", label_column="label", alias="champion", quiet=True)
    drifted = dict(cols)
    for c in SHIFTED:
        drifted[c] = cols[c] + 2 * cols[c].std()
    drifted[SCALED] = cols[SCALED] * 3
    bad = _write(tmp / "drifted <&>.csv", drifted)
    return tmp, reg, data, bad


def _report(capsys, tmp, reg, data, name, *extra):
    out, js = tmp / f"{name}.html", tmp / f"{name}.json"
    rc, stdout, err = _run(capsys, "drift", "report", "--registry", reg, "--model", "cardio", "--data", data,
                           "--out", out, "--json", js, *extra)
    assert rc == 0, err
    return stdout, out.read_text(encoding="utf-8"), json.loads(js.read_text())


def _self_contained(page):
    assert page.startswith("<!DOCTYPE html>") and page.count("<svg") >= 2
    lowered = page.lower()
    for needle in ("<script", "<link", "src=", "url(", "@import", "http://", "https://"):
        assert needle not in lowered, needle


def test_same_data_has_no_drift(setup, capsys):
    tmp, reg, data, _ = setup
    stdout, page, summary = _report(capsys, tmp, reg, data, "same", "--ref", "1")
    assert summary["model"] == "cardio" and summary["version"] == 1 and summary["rows"] == 1831 and summary["judged"]
    feats = summary["features"]
    assert len(feats) == 21 and {f["name"] for f in feats} >= {ODD, "x7", "x10"}
    assert all(f["state"] == "ok" for f in feats), feats
    assert all(set(f) >= {"name", "psi", "wasserstein", "state"} for f in feats)
    assert max(f["psi"] for f in feats) < 0.01 and summary["score_ks"] < 0.05
    assert not summary["score_drift"] and not summary["alert_rate_shift"]
    assert summary["alert_rate"] == pytest.approx(summary["expected_alert_rate"], abs=0.005)
    assert summary["data_quality"] == {}
    assert "0 drift, 0 warn of 21 features" in stdout
    _self_contained(page)
    assert "No feature drifted" in page


def test_drifted_features_come_first(setup, capsys):
    tmp, reg, _, bad = setup
    stdout, page, summary = _report(capsys, tmp, reg, bad, "drifted")
    feats = summary["features"]
    moved = {*SHIFTED, SCALED}
    assert {f["name"] for f in feats[:3]} == moved, feats[:4]
    assert all(f["state"] == "drift" for f in feats[:3])
    assert all(f["state"] == "ok" for f in feats[3:]), feats[3:]
    assert [f["psi"] for f in feats] == sorted((f["psi"] for f in feats), reverse=True)
    assert summary["score_drift"] and summary["score_ks"] >= 0.1
    assert set(summary["data_quality"]) <= moved and summary["data_quality"]  # shifted values leave the training range
    # the summary lines name the drifted features
    for name in moved:
        assert re.search(rf"drift +{re.escape(name)} +PSI", stdout), stdout
    # the page: every text escaped, the drifted features first in the table and the histograms
    _self_contained(page)
    assert ODD not in page and "drifted <&>" not in page
    esc = {f["name"]: f["name"].replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")
           for f in feats}
    assert "drifted &lt;&amp;&gt;.csv" in page
    figs = [page.index(f"<h3><code>{esc[f['name']]}</code>") for f in feats]
    rows = [page.index(f">{esc[f['name']]}</a></td>") for f in feats]
    assert figs == sorted(figs) and rows == sorted(rows)
    assert max(figs[:3]) < min(figs[3:]) and max(rows[:3]) < min(rows[3:])
    assert page.count('class="pill drift"') >= 3 + 1  # the three features and the score KS card


def test_bad_inputs_are_one_line_errors(setup, capsys, tmp_path):
    tmp, reg, data, _ = setup
    out = tmp_path / "r.html"
    lacking = _columns(data)
    del lacking["x7"]
    lacking_path = _write(tmp_path / "lacking.csv", lacking)
    empty = tmp_path / "empty.csv"
    empty.write_text(data.read_text().splitlines()[0] + "\n")
    cases = {
        "does not exist": ("--registry", reg, "--model", "cardio", "--data", tmp_path / "nope.csv"),
        "no model 'other'": ("--registry", reg, "--model", "other", "--data", data),
        "no version or alias 'nope'": ("--registry", reg, "--model", "cardio", "--ref", "nope", "--data", data),
        "['x7'] are missing": ("--registry", reg, "--model", "cardio", "--data", lacking_path),
        "no records": ("--registry", reg, "--model", "cardio", "--data", empty),
    }
    for expect, args in cases.items():
        rc, stdout, err = _run(capsys, "drift", "report", *args, "--out", out)
        assert rc == 2, (expect, err)
        assert err.startswith("outlierd: error: ") and expect in err and err.count("\n") == 1, err
        assert not out.exists()


def test_model_without_reference_profile(setup, capsys, tmp_path):
    from sklearn.ensemble import IsolationForest

    from training.export import export_sklearn

    _, reg, data, _ = setup
    cols = _columns(data)
    names = [c for c in cols if c != "label"]
    X = np.column_stack([cols[c] for c in names])
    forest = IsolationForest(n_estimators=10, random_state=0).fit(X)
    Registry(reg).publish("bare", export_sklearn(forest, tmp_path / "art", names), aliases=["champion"])
    rc, _, err = _run(capsys, "drift", "report", "--registry", reg, "--model", "bare", "--data", data,
                      "--out", tmp_path / "r.html")
    assert rc == 2 and err.startswith("outlierd: error: ") and "reference profile is empty" in err, err
    assert not (tmp_path / "r.html").exists()


def test_reject_policy_model_reports_unscored_records(setup, capsys, tmp_path):
    """A model that refuses NaN still gets its feature histograms; those records are not scored."""
    from sklearn.ensemble import IsolationForest

    from training.export import export_sklearn

    _, reg, data, _ = setup
    cols = _columns(data)
    names = [c for c in cols if c != "label"]
    X = np.column_stack([cols[c] for c in names])
    forest = IsolationForest(n_estimators=10, random_state=0).fit(X)
    Registry(reg).publish("strict", export_sklearn(forest, tmp_path / "art", names, X_train=X, missing="reject"),
                          aliases=["champion"])
    holes = dict(cols)
    holes["x7"] = cols["x7"].copy()
    holes["x7"][:50] = np.nan
    path = _write(tmp_path / "holes.csv", holes)
    rc, _, err = _run(capsys, "drift", "report", "--registry", reg, "--model", "strict", "--data", path,
                      "--out", tmp_path / "r.html", "--json", tmp_path / "r.json")
    assert rc == 0, err
    s = json.loads((tmp_path / "r.json").read_text())
    assert s["rows"] == 1831 and s["unscored_rows"] == 50 and s["records"] == 1781
    x7 = next(f for f in s["features"] if f["name"] == "x7")
    assert x7["missing_rate"] == pytest.approx(50 / 1831)
    assert s["data_quality"]["x7"]["missing"] == 50
    assert "were not scored" in (tmp_path / "r.html").read_text()


def test_column_gone_missing(setup, capsys, tmp_path):
    tmp, reg, data, _ = setup
    cols = _columns(data)
    cols["x7"] = np.full_like(cols["x7"], np.nan)
    stdout, page, summary = _report(capsys, tmp_path, reg, _write(tmp_path / "gone.csv", cols), "gone")
    x7 = next(f for f in summary["features"] if f["name"] == "x7")
    assert x7["missing_rate"] == 1.0 and summary["data_quality"]["x7"] == {"missing": 1831}
    assert "no values in the data" in page
    _self_contained(page)
