"""`outlierd drift report`: one file against a registry model's reference profile -> HTML + JSON."""

import json
import re

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pytest
from conftest import dataset_path

from outlierd.core.registry import Registry
from outlierd.cli import main
from outlierd.training.train import train

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
    # the banner names them, most drifted first
    banner = re.search(r'<div class="banner drift">([^<]*)</div>', page).group(1)
    assert banner.startswith(f"3 of {len(feats)} features drifted (" + ", ".join(esc[f["name"]] for f in feats[:3]) + ")"), banner


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
        "--top-records) must be an integer >= 0; got -1": ("--registry", reg, "--model", "cardio", "--data", data,
                                                          "--top-records", "-1"),
    }
    for expect, args in cases.items():
        rc, stdout, err = _run(capsys, "drift", "report", *args, "--out", out)
        assert rc == 2, (expect, err)
        assert err.startswith("outlierd: error: ") and expect in err and err.count("\n") == 1, err
        assert not out.exists()


def test_model_without_reference_profile(setup, capsys, tmp_path):
    from sklearn.ensemble import IsolationForest

    from outlierd.training.export import export_sklearn

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

    from outlierd.training.export import export_sklearn

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
    # records that were not scored are not listed; rows keep their place in the file
    rows = [r["row"] for r in s["top_records"]]
    assert len(rows) == 20 and min(rows) >= 50
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


# ------------------------------------------------------------------- explanations in the report

def _expected(reg, path):
    """Scores of every row of ``path`` by the champion, independently of the report."""
    from outlierd.training.data import load_dataset

    m = Registry(reg).load("cardio", "champion")
    X = load_dataset(path, feature_names=m.feature_names, require_rows=0).X
    return m, X, m.score(X)


def _check_explanations(m, X, scores, summary, n_top):
    names = m.feature_names
    # the listed records are the highest-scoring rows, highest first (ties: earlier row first)
    order = np.lexsort((np.arange(scores.size), -scores))[:n_top]
    top = summary["top_records"]
    assert [r["row"] for r in top] == order.tolist()
    np.testing.assert_allclose([r["score"] for r in top], scores[order], rtol=1e-12)
    assert [r["flagged"] for r in top] == (scores[order] >= m.threshold).tolist()
    # their features are model.explain's on those rows
    feat, contrib = m.explain(X[order], 3)
    for r, f, c in zip(top, feat, contrib):
        assert [x["name"] for x in r["features"]] == [names[j] for j in f]
        np.testing.assert_allclose([x["contribution"] for x in r["features"]], c, rtol=1e-9, atol=1e-12)
    # the "why are we alerting" counts: a NumPy recount over every flagged record
    flagged = np.flatnonzero(scores >= m.threshold)
    why = summary["alert_features"]
    assert why["flagged_records"] == flagged.size and why["top_k"] == 3
    f_all, _ = m.explain(X[flagged], 3)
    top1 = np.bincount(f_all[:, 0], minlength=len(names))
    in_k = np.bincount(f_all.ravel(), minlength=len(names))
    got = {f["name"]: f for f in why["features"]}
    assert set(got) == {names[j] for j in np.flatnonzero(in_k)}
    for j in np.flatnonzero(in_k):
        g = got[names[j]]
        assert (g["top1"], g["in_top_k"]) == (top1[j], in_k[j])
        assert g["top1_share"] == pytest.approx(top1[j] / flagged.size)
    assert [f["top1"] for f in why["features"]] == sorted((f["top1"] for f in why["features"]), reverse=True)
    assert sum(f["top1"] for f in why["features"]) == flagged.size


def test_most_anomalous_records_and_why_alerting(setup, capsys):
    """The drifted file: many flagged records; the shifted features explain most alerts."""
    tmp, reg, _, bad = setup
    stdout, page, summary = _report(capsys, tmp, reg, bad, "why")
    m, X, scores = _expected(reg, bad)
    assert (scores >= m.threshold).sum() > 20  # every listed record comes from the flagged_only pass
    _check_explanations(m, X, scores, summary, 20)
    assert "top features of the" in stdout and summary["alert_features"]["features"][0]["name"] in stdout
    # the page: both sections, names escaped, one table row per listed record
    _self_contained(page)
    assert "<h2>Why are we alerting</h2>" in page and "<h2>Most anomalous records</h2>" in page
    section = page[page.index("<h2>Most anomalous records</h2>"):page.index("<h2>Features, most drifted first</h2>")]
    assert section.count("<tr class=") == 20 and ODD not in page
    first = summary["top_records"][0]
    assert f"<td>{first['row']:,}</td>" in section


def test_top_records_beyond_the_flagged_ones(setup, capsys, rng, tmp_path):
    """Fresh rows of the training file, a few pushed out: more records listed than flagged, so the
    unflagged ones among them are explained too; --top-records 0 lists none."""
    _, reg, data, _ = setup
    cols = _columns(data)
    n = 900
    pick = rng.choice(1831, size=n, replace=False)
    sample = {c: v[pick].copy() for c, v in cols.items()}
    names = [c for c in cols if c != "label"]
    for i in rng.choice(n, size=5, replace=False):
        c = names[rng.integers(len(names))]
        sample[c][i] += rng.uniform(4, 8) * cols[c].std()
    path = _write(tmp_path / "sample.csv", sample)
    m, X, scores = _expected(reg, path)
    n_top = int((scores >= m.threshold).sum()) + 15
    _, page, summary = _report(capsys, tmp_path, reg, path, "beyond", "--top-records", n_top)
    assert sum(not r["flagged"] for r in summary["top_records"]) == 15
    _check_explanations(m, X, scores, summary, n_top)
    _, page, summary = _report(capsys, tmp_path, reg, path, "none", "--top-records", 0)
    assert summary["top_records"] == [] and "<h2>Most anomalous records</h2>" not in page
    assert summary["alert_features"]["flagged_records"] == int((scores >= m.threshold).sum())


def test_report_takes_records_as_data(setup):
    """monitoring does not load files: any records with the model's features in its order will do."""
    from types import SimpleNamespace

    from outlierd.core.errors import DataError
    from outlierd.monitoring.report import build_report

    _, reg, data, _ = setup
    m, X, scores = _expected(reg, data)
    rep = build_report(reg, "cardio", SimpleNamespace(X=X[:500], feature_names=list(m.feature_names), path="memory",
                                                      warnings=[]))
    assert rep.rows == 500 and rep.data == "memory" and rep.flagged == int((scores[:500] >= m.threshold).sum())
    swapped = list(reversed(m.feature_names))
    with pytest.raises(DataError, match="are not the features of 'cardio'"):
        build_report(reg, "cardio", SimpleNamespace(X=X, feature_names=swapped, path="memory", warnings=[]))
    with pytest.raises(DataError, match="no records"):
        build_report(reg, "cardio", SimpleNamespace(X=X[:0], feature_names=list(m.feature_names), path="memory", warnings=[]))
