"""Issue 14, item 11: with partially labelled data, the default detector (no --detector) uses the
labels when there are enough of each kind (it becomes ``auto``), the lineage records what it chose
and why, and an explicit ``--detector iforest`` keeps its meaning. End to end through the CLI, on
cardio with 1% of its training rows labelled, measured on held-out rows no model saw.

Fixed seeds (split, labels, fits): the quality claim must not depend on a lucky draw.
``benchmarks/label_quality.py`` measures the same on four data sets with several seeds."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pytest
from conftest import dataset_path, run_cli
from sklearn.metrics import average_precision_score
from sklearn.model_selection import train_test_split

from outlierd.core import load_model


def _write(path, X, names, labels=None):
    cols = {f: X[:, j] for j, f in enumerate(names)}
    if labels is not None:
        cols["label"] = pa.array(labels, type=pa.int64())
    pacsv.write_csv(pa.table(cols), path)
    return path


def _train_json(*args):
    res = run_cli("train", *map(str, args), "--quiet", "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    return out, load_model(out["path"])


@pytest.fixture(scope="module")
def cardio_one_percent(tmp_path_factory):
    """Cardio split 70/30 (stratified), an unsupervised model on the 70%, and 1% of the training
    rows labelled the way reviewers label them: drawn from that model's alerts plus a 1% sample of
    the rest (what the capture store keeps). The rest of the label column is empty."""
    tmp = tmp_path_factory.mktemp("default-labels")
    table = pacsv.read_csv(dataset_path("cardio"))
    names = [c for c in table.column_names if c != "label"]
    X = np.column_stack([table.column(c).to_numpy().astype(np.float64) for c in names])
    y = table.column("label").to_numpy().astype(np.int64)
    tr, te = train_test_split(np.arange(y.size), test_size=0.3, stratify=y, random_state=11)
    reg = tmp / "reg"
    unsup_out, unsup = _train_json("--data", _write(tmp / "u.csv", X[tr], names), "--registry", reg, "--model", "u")
    rng = np.random.default_rng(5)
    flagged = unsup.score(X[tr]) >= unsup.threshold
    rest = np.flatnonzero(~flagged)
    pool = np.r_[np.flatnonzero(flagged), rng.choice(rest, size=int(round(0.01 * rest.size)), replace=False)]
    reveal = rng.choice(pool, size=int(round(0.01 * tr.size)), replace=False)
    labels = [None] * tr.size
    for i in reveal:
        labels[i] = int(y[tr][i])
    data = _write(tmp / "l.csv", X[tr], names, labels)
    return {"X": X, "y": y, "tr": tr, "te": te, "reg": reg, "data": data, "unsup": unsup, "unsup_out": unsup_out,
            "anomalies": int(y[tr][reveal].sum()), "labelled": int(reveal.size)}


def _pr_auc(d, model):
    return average_precision_score(d["y"][d["te"]], model.score(d["X"][d["te"]]))


def test_default_uses_partial_labels_and_beats_unsupervised_on_held_out_rows(cardio_one_percent):
    d = cardio_one_percent
    assert d["labelled"] == 13 and d["anomalies"] >= 2 and d["labelled"] - d["anomalies"] >= 2  # the premise
    out, model = _train_json("--data", d["data"], "--registry", d["reg"], "--model", "default", "--label-column", "label")
    lineage = model.manifest["lineage"]
    choice = lineage["detector_choice"]
    assert choice["given"] is False and choice["default"] == "iforest" and choice["resolved"] == "auto"
    assert choice["anomalies"] == d["anomalies"] and "out of fold" in choice["reason"]
    assert choice["chosen"] == out["metrics"]["chosen"] == model.kind  # what was fitted
    assert lineage["parameters"]["detector"] == "auto"  # a retrain that inherits it keeps using labels
    assert out["metrics"]["detector_default"] == "auto"
    ap_u, ap_d = _pr_auc(d, d["unsup"]), _pr_auc(d, model)
    assert ap_d >= 1.2 * ap_u, (ap_u, ap_d, choice)


def test_explicit_iforest_stays_unsupervised(cardio_one_percent):
    d = cardio_one_percent
    out, model = _train_json("--data", d["data"], "--registry", d["reg"], "--model", "explicit", "--label-column", "label",
                             "--detector", "iforest")
    lineage = model.manifest["lineage"]
    assert "detector_choice" not in lineage and "detector_default" not in out["metrics"]
    assert lineage["parameters"]["detector"] == "iforest" and out["metrics"]["chosen"] == "iforest"
    assert model.kind == "iforest"
    assert "selection_pr_auc" not in out["metrics"]  # nothing chosen among candidates
    # the unsupervised model (without labels) records that the default stayed iforest, and why
    choice = d["unsup"].manifest["lineage"]["detector_choice"]
    assert (choice["given"], choice["resolved"], choice["chosen"]) == (False, "iforest", "iforest")
    assert choice["reason"] == "no labels for training"


def test_default_with_too_few_labels_of_a_kind_stays_iforest(tmp_path, rng):
    X = rng.normal(size=(300, 3))
    labels = [None] * 300
    labels[0], labels[1], labels[2] = 1, 0, 0  # one labelled anomaly: nothing to choose with
    out, model = _train_json("--data", _write(tmp_path / "d.csv", X, ["a", "b", "c"], labels), "--registry",
                             tmp_path / "r", "--model", "m", "--label-column", "label")
    choice = model.manifest["lineage"]["detector_choice"]
    assert (choice["resolved"], choice["chosen"], model.kind) == ("iforest", "iforest", "iforest")
    assert "fewer than 2 of each kind" in choice["reason"]
    assert model.manifest["lineage"]["labels"]["excluded_anomalies"] == 1  # labels still used as before


def test_default_stacks_with_three_labelled_anomalies(cardio_one_percent, tmp_path):
    """With 3 labelled anomalies (below the former minimum of 5) the default fits the stacked model
    with a small weight on the labels (alpha = 3 / 13), and it ranks the held-out rows better than
    the unsupervised model (scikit-learn's average precision on rows no model saw)."""
    d = cardio_one_percent
    labels = pacsv.read_csv(d["data"]).column("label").to_pylist()
    anomalies = [i for i, v in enumerate(labels) if v == 1]
    assert len(anomalies) > 3
    for i in anomalies[3:]:
        labels[i] = None  # keep the labels of 3 anomalies and of every labelled normal
    names = [c for c in pacsv.read_csv(d["data"]).column_names if c != "label"]
    data = _write(tmp_path / "three.csv", d["X"][d["tr"]], names, labels)
    out, model = _train_json("--data", data, "--registry", d["reg"], "--model", "three", "--label-column", "label")
    assert model.manifest["lineage"]["detector_choice"]["anomalies"] == 3
    assert out["metrics"]["chosen"] == model.kind == "stacked"
    assert out["metrics"]["stacked_alpha"] == pytest.approx(3 / 13)
    ap_u, ap_d = _pr_auc(d, d["unsup"]), _pr_auc(d, model)
    assert ap_d > ap_u, (ap_u, ap_d)
