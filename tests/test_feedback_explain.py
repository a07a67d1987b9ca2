"""``outlierd feedback stats``: which features explain the captured records labelled anomaly (each
record's top-1 feature from the champion's ``model.explain``), checked against a recount from what
was written to the store: latest label per record, its latest champion capture."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import dataset_path

from outlierd.core.registry import Registry
from outlierd.monitoring.quality import anomaly_features
from outlierd.monitoring.store import LABELS, LabelRow, open_store
from outlierd.cli import main

MODEL = "cardio"


@pytest.fixture(scope="module")
def registry_dir(tmp_path_factory):
    from outlierd.training.train import train

    reg = tmp_path_factory.mktemp("fbx") / "reg"
    data = dataset_path("cardio")
    train(data, reg, MODEL, label_column="label", alias="champion", quiet=True)                       # v1 iforest
    train(data, reg, MODEL, label_column="label", detector="robust_z", alias="champion", quiet=True)  # v2 robust_z
    return reg


def _cardio_X() -> np.ndarray:
    return np.loadtxt(dataset_path("cardio"), delimiter=",", skiprows=1)[:, :-1]


def _stats(capsys, reg, store, *extra):
    rc = main(["feedback", "stats", "--registry", str(reg), "--model", MODEL, "--feedback-store", str(store), *extra])
    out, err = capsys.readouterr()
    assert rc == 0, err
    return out


def _fill(store_path, rng):
    """Random captures of cardio rows (some pushed out) and random labels, with the cases that decide
    which record counts: relabelled records, recaptured records, challenger-only captures, unknown ids.
    Returns the oracle's input: {record id: features of its latest champion capture} for the records
    whose latest label is anomaly."""
    X = _cardio_X()
    n = 300
    rows = rng.choice(X.shape[0], size=n, replace=False)
    Xc = X[rows].copy()
    for i in rng.choice(n, size=40, replace=False):
        Xc[i, rng.integers(X.shape[1])] += rng.uniform(3, 8) * X[:, rng.integers(X.shape[1])].std() + 1
    Xc = Xc.astype(np.float32)  # captures hold float32 features
    ids = [f"r{i}" for i in range(n)]
    s = open_store(store_path)
    flagged = rng.random(n) < 0.3
    s.add_predictions(MODEL, 1, "champion", ids, Xc, rng.random(n), flagged, ~flagged, 1.0, sample_rate=0.05)
    latest_x = {rid: Xc[i] for i, rid in enumerate(ids)}
    # 30 records captured again later with other features: their latest capture counts
    again = rng.choice(n, size=30, replace=False)
    X2 = X[rng.choice(X.shape[0], size=30)].astype(np.float32)
    s.add_predictions(MODEL, 1, "champion", [ids[i] for i in again], X2, rng.random(30), np.ones(30, bool), np.zeros(30, bool), 1.0)
    latest_x.update({ids[i]: X2[k] for k, i in enumerate(again)})
    # challenger-only captures: labelled, but not records the champion scored
    ch_ids = [f"c{i}" for i in range(20)]
    s.add_predictions(MODEL, 2, "challenger", ch_ids, X[:20].astype(np.float32), rng.random(20), np.ones(20, bool), np.zeros(20, bool), 1.0)
    labels = [LabelRow(ids[int(i)], LABELS[int(rng.random() < 0.6)], f"rev{int(rng.integers(3))}")
              for i in rng.integers(0, n, 250)]
    labels += [LabelRow(r, "anomaly") for r in ch_ids] + [LabelRow(f"unknown{i}", "anomaly") for i in range(10)]
    rng.shuffle(labels)
    s.add_labels(MODEL, labels[:150])
    s.add_labels(MODEL, labels[150:])
    s.close()
    latest: dict[str, str] = {}
    for r in labels:
        latest[r.record_id] = r.label
    return {rid: latest_x[rid] for rid, lab in latest.items() if lab == "anomaly" and rid in latest_x}


@pytest.mark.parametrize("champion", [1, 2])
def test_stats_counts_top_features_of_labelled_anomalies(registry_dir, tmp_path, rng, capsys, champion):
    Registry(registry_dir).set_alias(MODEL, "champion", champion)
    store = tmp_path / "fb.sqlite"
    anomalies = _fill(store, rng)
    # oracle: the champion's top-1 feature of each such record, counted with NumPy
    model = Registry(registry_dir).load(MODEL, champion)
    A = np.stack(list(anomalies.values())).astype(np.float64)
    top1 = model.explain(A, 1)[0][:, 0]
    full = model.explain(A, model.n_features)[0]  # the top-1 feature is the first of the full ranking
    assert np.array_equal(full[:, 0], top1)
    counts = np.bincount(top1, minlength=model.n_features)

    got = json.loads(_stats(capsys, registry_dir, store, "--json"))["anomaly_features"]
    assert got["version"] == champion and got["records"] == len(anomalies) and got["note"] is None
    assert {f["name"]: f["count"] for f in got["features"]} == {model.feature_names[j]: int(counts[j]) for j in np.flatnonzero(counts)}
    assert [f["count"] for f in got["features"]] == sorted((f["count"] for f in got["features"]), reverse=True)
    for f in got["features"]:
        assert f["share"] == pytest.approx(f["count"] / len(anomalies))
    text = _stats(capsys, registry_dir, store)
    assert "anomalies by" in text and got["features"][0]["name"] in text
    assert f"top feature of {len(anomalies)} labelled anomalies, champion version {champion}" in text


def test_anomaly_features_only_counts_anomalies(registry_dir, rng):
    model = Registry(registry_dir).load(MODEL, 1)
    X = _cardio_X()[rng.choice(1831, size=60, replace=False)]
    y = (rng.random(60) < 0.5).astype(np.int8)
    got = anomaly_features(model, X, y)
    counts = np.bincount(model.explain(X[y == 1], 1)[0][:, 0], minlength=model.n_features)
    assert got["records"] == int(y.sum()) and sum(f["count"] for f in got["features"]) == int(y.sum())
    assert {f["name"]: f["count"] for f in got["features"]} == {model.feature_names[j]: int(counts[j]) for j in np.flatnonzero(counts)}
    none = anomaly_features(model, X, np.zeros(60, np.int8))
    assert none["records"] == 0 and none["features"] == []


def test_no_labelled_anomaly_and_unexplainable_captures_are_notes(registry_dir, tmp_path, rng, capsys):
    """Stats still answer; the explanation part says why it is empty."""
    Registry(registry_dir).set_alias(MODEL, "champion", 1)
    X = _cardio_X()
    store = tmp_path / "normal.sqlite"
    s = open_store(store)
    s.add_predictions(MODEL, 1, "champion", ["a", "b"], X[:2], rng.random(2), np.ones(2, bool), np.zeros(2, bool), 1.0)
    s.add_labels(MODEL, [LabelRow("a", "normal"), LabelRow("b", "normal")])
    s.close()
    got = json.loads(_stats(capsys, registry_dir, store, "--json"))
    assert got["anomaly_features"]["features"] == [] and "no captured record is labelled anomaly" in got["anomaly_features"]["note"]
    assert got["labels"] == 2
    # captures of another feature count (an older model with other columns): not explained, not an error
    store = tmp_path / "narrow.sqlite"
    s = open_store(store)
    s.add_predictions(MODEL, 1, "champion", ["a"], rng.standard_normal((1, 5)), rng.random(1), np.ones(1, bool), np.zeros(1, bool), 1.0)
    s.add_labels(MODEL, [LabelRow("a", "anomaly")])
    s.close()
    text = _stats(capsys, registry_dir, store)
    assert "note: labelled anomalies not explained: X has 5 features per record; this model expects 21" in text
    assert "precision" in text
