"""Label-aware training (training/semi.py) and the stacked detector (core/stacked.py)."""

import hashlib
import json

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pytest
from naive import hbos as naive_hbos
from naive import prep as naive_prep
from naive import robust_z as naive_robust_z
from sklearn.metrics import average_precision_score

from outlierd.core import load_model
from outlierd.core.artifact import load_npz
from outlierd.cli import main
from outlierd.training import labels as semi_labels
from outlierd.training.train import train


def _write(path, X, labels=None, label_name="label"):
    cols = {f"f{j}": X[:, j] for j in range(X.shape[1])}
    if labels is not None:
        cols[label_name] = labels if isinstance(labels, pa.Array) else pa.array(labels)
    pacsv.write_csv(pa.table(cols), path)
    return path


def _partial(y, reveal):
    """An int64 column with the labels of rows ``reveal`` and nulls (empty cells) elsewhere."""
    return pa.array([int(v) if i in reveal else None for i, v in enumerate(y)], type=pa.int64())


def planted(rng, n, d=6, rate=0.05):
    """Correlated Gaussian normals; anomalies a tight cluster at a moderate offset, inside the
    normals' marginal ranges: unsupervised detectors see them poorly, a few labels reveal them."""
    L = np.linalg.cholesky(np.full((d, d), 0.5) + 0.5 * np.eye(d))
    X = rng.normal(size=(n, d)) @ L.T
    y = np.zeros(n, dtype=np.int64)
    k = int(rate * n)
    idx = rng.choice(n, size=k, replace=False)
    direction = np.zeros(d)
    direction[0], direction[1] = 1.8, -1.8  # against the correlation: unusual jointly, not marginally
    X[idx] = direction + 0.3 * rng.normal(size=(k, d))
    y[idx] = 1
    return X, y


def _run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


# --- labels in -----------------------------------------------------------------------------

def test_partial_labels_parse_every_spelling(tmp_path, rng):
    n = 200
    truth = rng.integers(-1, 2, size=n)
    spell = {1: ["1", "true", "TRUE", "anomaly", "Anomaly"], 0: ["0", "false", "False", "normal", "NORMAL"], -1: ["", " "]}
    cells = [spell[int(v)][rng.integers(len(spell[int(v)]))] for v in truth]
    X = rng.normal(size=(n, 2))
    path = _write(tmp_path / "d.csv", X, pa.array(cells, type=pa.string()))
    got = semi_labels.read_label_column(path, "label")
    assert got.dtype == np.int8
    np.testing.assert_array_equal(got, truth)
    # a numeric column: empty cells are nulls
    path = _write(tmp_path / "n.csv", X, _partial(np.maximum(truth, 0), set(np.flatnonzero(truth >= 0).tolist())))
    np.testing.assert_array_equal(semi_labels.read_label_column(path, "label"), truth)
    # booleans
    b = pa.array([None if v < 0 else bool(v) for v in truth], type=pa.bool_())
    np.testing.assert_array_equal(semi_labels.parse_labels(b, "label"), truth)
    ld = semi_labels.load_labelled_data(path, "label")
    assert ld.feature_names == ["f0", "f1"] and ld.X.shape == (n, 2)
    assert (ld.anomalies, ld.normals) == (int(np.sum(truth == 1)), int(np.sum(truth == 0)))


@pytest.mark.parametrize(
    "labels,extra,message",
    [
        (None, ["--label-column", "y"], "label column 'y' not found"),
        (["1", "", "maybe", "0"] * 10, ["--label-column", "label"], "must hold 0 (normal) or 1 (anomaly); found ['maybe']"),
        ([2, None, 0, 1] * 10, ["--label-column", "label"], "must hold 0 (normal) or 1 (anomaly); found [2.0]"),
        ([1, None, None, None] + [0, None, None, None] * 9, ["--label-column", "label", "--select", "iforest,hbos"],
         "--select compares detectors on labelled records and needs at least 2 labelled anomalies"),
        ([1, 1, None, 0] * 10, ["--label-column", "label", "--detector", "stacked", "--min-labels", "20"],
         "stacked model needs at least 20 labelled anomalies"),
        ([1, 1, None, 0] * 10, ["--label-column", "label", "--detector", "hbos", "--select", "iforest"],
         "--select chooses the detector; drop --detector hbos"),
        ([1, 1, None, 0] * 10, ["--label-column", "label", "--select", "iforest,magic"], "--select takes a comma-separated list"),
        (None, ["--labels-from-feedback"], "no feedback store at"),
    ],
)
def test_label_errors_are_one_line_exit_2(tmp_path, capsys, rng, labels, extra, message):
    X = rng.normal(size=(40, 3))
    lab = None if labels is None else pa.array(labels)
    data = _write(tmp_path / "d.csv", X, lab)
    rc, out, err = _run(capsys, "train", "--data", data, "--registry", tmp_path / "r", "--model", "m", "--quiet", *extra)
    assert rc == 2, err
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_fully_labelled_column_stays_evaluation_only(tmp_path, rng):
    X, y = planted(rng, 600)
    a = train(_write(tmp_path / "a.csv", X, y), tmp_path / "r", "a", label_column="label", quiet=True)
    b = train(_write(tmp_path / "b.csv", X), tmp_path / "r", "b", quiet=True)
    # same fit (every row, sklearn's forest) and threshold; only the in-sample metrics are added
    assert (a.path / "arrays.npz").read_bytes() == (b.path / "arrays.npz").read_bytes()
    assert a.threshold == b.threshold
    m = load_model(a.path).manifest
    assert "labels" not in m["lineage"] and "label_eval" not in m["metrics"]
    assert m["metrics"]["rows"] == 600 and m["lineage"]["parameters"]["label_column"] == "label"


# --- labels used ---------------------------------------------------------------------------

def test_known_anomalies_are_left_out_of_the_fit(tmp_path, rng):
    X, y = planted(rng, 500)
    known_idx = np.flatnonzero(y == 1)[:12]
    X[known_idx, 2] += 50.0  # the known anomalies would stretch the histograms' range
    reveal = set(known_idx.tolist()) | set(rng.choice(np.flatnonzero(y == 0), 30, replace=False).tolist())
    res = train(_write(tmp_path / "d.csv", X, _partial(y, reveal)), tmp_path / "r", "m", detector="hbos",
                label_column="label", quiet=True, seed=int(rng.integers(1000)))
    arrays = load_npz(res.path / "arrays.npz")
    known = np.array([i in reveal and y[i] == 1 for i in range(len(y))])
    np.testing.assert_array_equal(arrays["hb_lo"], X[~known].min(axis=0))
    np.testing.assert_array_equal(arrays["hb_hi"], X[~known].max(axis=0))
    assert not np.array_equal(arrays["hb_hi"], X.max(axis=0))
    lab = load_model(res.path).manifest["lineage"]["labels"]
    assert lab["fit_rows"] == 500 - 12 and lab["excluded_anomalies"] == 12
    assert res.metrics["chosen"] == "hbos" and "out-of-fold" in res.metrics["label_eval"]


def test_labels_raise_pr_auc_on_held_out_records(tmp_path, rng):
    X, y = planted(rng, 2600)
    tr, te = np.arange(2000), np.arange(2000, 2600)
    reveal = set(rng.choice(2000, size=300, replace=False).tolist())
    seed = int(rng.integers(1000))
    unsup = train(_write(tmp_path / "u.csv", X[tr]), tmp_path / "r", "u", seed=seed, quiet=True)
    aware = train(_write(tmp_path / "l.csv", X[tr], _partial(y[tr], reveal)), tmp_path / "r", "l",
                  detector="auto", label_column="label", seed=seed, quiet=True)
    ap_u = average_precision_score(y[te], load_model(unsup.path).score(X[te]))
    ap_l = average_precision_score(y[te], load_model(aware.path).score(X[te]))
    assert ap_l > ap_u + 0.1, (ap_u, ap_l, aware.metrics["selection_pr_auc"])
    assert aware.metrics["chosen"] == "stacked"


def test_stacked_artifact_reproduces_a_float64_numpy_reference(tmp_path, rng):
    X, y = planted(rng, 900, d=4)
    reveal = set(rng.choice(900, size=200, replace=False).tolist())
    res = train(_write(tmp_path / "d.csv", X, _partial(y, reveal)), tmp_path / "r", "m", detector="stacked",
                select="robust_z,hbos,knn", label_column="label", quiet=True, seed=int(rng.integers(1000)))
    model = load_model(res.path)  # verifies checksums and the probe (serial and parallel kernels)
    assert model.kind == "stacked"
    probe = load_npz(res.path / "probe.npz")
    np.testing.assert_allclose(model.score(probe["X"]), probe["expected"], rtol=1e-12, atol=0)

    params = model.manifest["detector"]["params"]
    arrays = load_npz(res.path / "arrays.npz")
    Xq = np.vstack([rng.normal(size=(50, 4)) * 3, X[:20]])
    Xq[3, 1], Xq[7, 2], Xq[9, 0] = np.nan, np.inf, -np.inf
    base_scores = []
    for base in params["bases"]:
        a = {k[len(base["prefix"]):]: v for k, v in arrays.items() if k.startswith(base["prefix"])}
        Xp = naive_prep(Xq, a["prep_median"], a["prep_center"], a["prep_scale_inv"])
        if base["kind"] == "robust_z":
            base_scores.append(naive_robust_z(Xp, a["rz_median"], a["rz_scale_inv"]))
        elif base["kind"] == "hbos":
            base_scores.append(naive_hbos(Xp, a["hb_lo"], a["hb_hi"], a["hb_inv_width"], a["hb_table"]))
        else:
            dist = np.sqrt(((Xp[:, None, :] - a["nn_ref"][None, :, :]) ** 2).sum(axis=2))
            base_scores.append(np.sort(dist, axis=1)[:, base["params"]["k"] - 1])
    ranks = []
    for i, s in enumerate(base_scores):
        knots, levels = arrays[f"st_knots_{i}"], arrays[f"st_levels_{i}"]
        r = np.empty_like(s)
        for q, v in enumerate(s):  # piecewise linear, clamped at both ends
            if v <= knots[0]:
                r[q] = levels[0]
            elif v >= knots[-1]:
                r[q] = levels[-1]
            else:
                j = np.searchsorted(knots, v, side="right") - 1
                t = (v - knots[j]) / (knots[j + 1] - knots[j])
                r[q] = levels[j] + t * (levels[j + 1] - levels[j])
        ranks.append(r)
    Xp = naive_prep(Xq, arrays["prep_median"], arrays["prep_center"], arrays["prep_scale_inv"])
    z = np.clip((Xp - arrays["st_center"]) * arrays["st_scale_inv"], -params["clip"], params["clip"])
    logit = np.column_stack(ranks + [z]) @ arrays["st_coef"] + float(arrays["st_intercept"])
    p = 1.0 / (1.0 + np.exp(-logit))
    expected = (1 - params["alpha"]) * ranks[params["primary"]] + params["alpha"] * p
    np.testing.assert_allclose(model.score(Xq), expected, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(model.score(np.tile(Xq, (30, 1)))[: len(Xq)], expected, rtol=1e-10, atol=1e-12)
    # explanations: the label model's per-feature terms alpha * v_j * z_j, largest first
    C = params["alpha"] * z * arrays["st_coef"][len(params["bases"]):]
    feat, contrib = model.explain(Xq, 2)
    np.testing.assert_allclose(contrib, -np.sort(-C, axis=1)[:, :2], rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(C[np.arange(len(Xq)), feat[:, 0]], contrib[:, 0], rtol=1e-12, atol=1e-15)

    # provenance: counts, the column, a fingerprint of the label set, out-of-fold metrics
    lab = model.manifest["lineage"]["labels"]
    na, nn = sum(y[i] == 1 for i in reveal), sum(y[i] == 0 for i in reveal)
    pairs = sorted((f"row:{i}", int(y[i])) for i in reveal)
    assert (lab["anomalies"], lab["normals"], lab["unlabelled"], lab["label_column"]) == (na, nn, 900 - 200, "label")
    src = lab["sources"][0]
    assert src["source"] == "column" and src["sha256"] == hashlib.sha256(json.dumps(pairs, separators=(",", ":")).encode()).hexdigest()
    assert model.metrics["label_eval"].startswith("5-fold out-of-fold on 200 labelled records")
    assert model.metrics["rows"] == 200 and model.metrics["stacked_bases"] == ["robust_z", "hbos", "knn"]


def test_labels_from_the_feedback_store_are_appended(tmp_path, rng):
    from outlierd.monitoring.store import LabelRow, open_store

    X, y = planted(rng, 700, d=4)
    file_rows, captured = np.arange(500), np.arange(500, 700)
    reg = tmp_path / "r"
    reg.mkdir()
    store = open_store(reg / "feedback.sqlite")
    ids = [f"rec-{i}" for i in captured]
    store.add_predictions("m", 1, "champion", ids, X[captured].astype(np.float32), np.zeros(200), np.zeros(200, bool),
                          np.ones(200, bool), 1.0)
    labelled = rng.choice(200, size=80, replace=False)
    store.add_labels("m", [LabelRow(ids[i], "anomaly" if y[captured[i]] else "normal", reviewer="t") for i in labelled])
    store.close()
    data = _write(tmp_path / "d.csv", X[file_rows])
    from outlierd.feedback_cli import labelled_records

    res = train(data, reg, "m", feedback=labelled_records(reg, "m"), detector="robust_z", quiet=True)
    lab = load_model(res.path).manifest["lineage"]["labels"]
    na = int(sum(y[captured[i]] for i in labelled))
    assert res.rows == 500 + 80 and lab["anomalies"] == na and lab["normals"] == 80 - na
    fb = lab["sources"][0]
    assert fb["source"] == "feedback" and fb["records"] == 80 and fb["model"] == "m"
    pairs = sorted((ids[i], int(y[captured[i]])) for i in labelled)
    assert fb["sha256"] == hashlib.sha256(json.dumps(pairs, separators=(",", ":")).encode()).hexdigest()
    # the appended records take part in the fit: robust_z's medians are those of file rows + normals
    fit = np.vstack([X[file_rows], X[captured[labelled]][y[captured[labelled]] == 0].astype(np.float32)])
    np.testing.assert_allclose(load_npz(res.path / "arrays.npz")["rz_median"], np.median(fit, axis=0), rtol=1e-12)
    # the CLI reads the same records from the store and hands them to training as data
    rc = main(["train", "--data", str(data), "--registry", str(reg), "--model", "m", "--labels-from-feedback",
               "--detector", "robust_z", "--quiet"])
    assert rc == 0
    cli = load_model(reg / "m" / "2").manifest["lineage"]["labels"]["sources"][0]
    assert cli == fb


# --- unlabelled records as weak normals (positive-unlabelled) --------------------------------

def test_label_weights_balance_the_classes_and_share_the_normals(rng):
    from sklearn.utils.class_weight import compute_sample_weight

    from outlierd.training.semi import label_weights

    y = (rng.random(40) < 0.3).astype(np.int64)
    y[:2] = (1, 0)
    # no unlabelled rows: scikit-learn's "balanced" weights exactly
    np.testing.assert_allclose(label_weights(y, 0, 1.0), compute_sample_weight("balanced", y), rtol=1e-12)
    for share in (0.5, 1.0, 3.0):
        w = label_weights(y, 97, share)
        assert w.shape == (40 + 97,)
        wl, wu = w[:40], w[40:]
        assert wl[y == 1].sum() == pytest.approx(20.0) and wl[y == 0].sum() + wu.sum() == pytest.approx(20.0)
        assert wu.sum() == pytest.approx(share * wl[y == 0].sum())  # the unlabelled normals' total weight
        assert np.ptp(wu) == 0 and np.ptp(wl[y == 0]) == 0


def test_unlabelled_normals_are_ranked_out_of_fold(rng):
    """The unlabelled sample's ranks come from fold models fitted without those rows (and without
    the fold's labelled rows and every known anomaly): a NumPy robust_z oracle fitted on exactly
    those rows gives the same ranks."""
    from outlierd.core.stacked import rank_normalise, rank_table
    from outlierd.training.semi import MAD_TO_SIGMA, MEANAD_TO_SIGMA, calibration_rows, out_of_fold

    n = 400
    X, truth = planted(rng, n, d=3)
    y = np.full(n, -1, dtype=np.int64)
    lab = rng.choice(n, size=40, replace=False)
    y[lab] = truth[lab]
    y[lab[:4]], y[lab[4:8]] = 1, 0
    seed = int(rng.integers(1000))
    oof = out_of_fold(X, y, ["robust_z"], folds=3, seed=seed, unlabelled=50)
    assert oof.unlabelled.size == 50 and np.all(y[oof.unlabelled] == -1) and np.unique(oof.unlabelled).size == 50
    assert sorted(np.bincount(oof.unlabelled_folds).tolist()) == [16, 17, 17]
    calib = calibration_rows(n, seed)
    for f in range(3):
        fit = y != 1
        fit[oof.labelled[oof.folds == f]] = False
        fit[oof.unlabelled[oof.unlabelled_folds == f]] = False
        med = np.median(X[fit], axis=0)
        dev = np.abs(X[fit] - med)
        scale = MAD_TO_SIGMA * np.median(dev, axis=0)
        scale = np.where(scale > 0, scale, MEANAD_TO_SIGMA * dev.mean(axis=0))
        score = naive_robust_z(X, med, 1.0 / scale)
        knots, levels = rank_table(score[calib])
        rows = oof.unlabelled[oof.unlabelled_folds == f]
        np.testing.assert_allclose(oof.unlabelled_rank["robust_z"][oof.unlabelled_folds == f],
                                   rank_normalise(score[rows], knots, levels), rtol=1e-9, atol=1e-12)
    # none asked for: none taken, and the labelled ranks are those of the plain out-of-fold scoring
    plain = out_of_fold(X, y, ["robust_z"], folds=3, seed=seed)
    assert plain.unlabelled.size == 0 and plain.unlabelled_rank == {}


# --- the stacked model is not dropped on the labelled records' say ---------------------------

def _few_labels(rng, n=600):
    from outlierd.training.labels import LabelledData

    X, truth = planted(rng, n, d=4)
    y = np.full(n, -1, dtype=np.int8)
    lab = np.r_[rng.choice(np.flatnonzero(truth == 1), 6, replace=False),
                rng.choice(np.flatnonzero(truth == 0), 20, replace=False)]
    y[lab] = truth[lab]
    return LabelledData(X, [f"f{j}" for j in range(4)], y, n, {})


@pytest.mark.parametrize("detector", ["auto", "stacked"])
def test_stacked_is_taken_whatever_the_bootstrap_says_unless_a_guard_is_set(rng, monkeypatch, detector):
    """With enough labels of each kind the stacked model is taken (no guard by default), and the
    bootstrap comparison with the best unsupervised detector is recorded in the notes; a guard of
    share 0 (every comparison "fires") restores the old either/or for auto, never for an explicit
    --detector stacked."""
    from outlierd.training import semi

    ld = _few_labels(rng)
    seed = int(rng.integers(1000))
    select = ("robust_z", "hbos", "stacked")
    p = semi.plan(ld, detector=detector, select=select, seed=seed)
    assert p.chosen == "stacked" and p.alpha == pytest.approx(6 / 16)
    note = [n for n in p.notes if "ranks the labelled records better than the stacked model on" in n]
    assert len(note) == 1 and note[0].startswith(p.bases[p.primary])
    monkeypatch.setattr(semi, "STACKED_GUARD", 0.0)
    g = semi.plan(ld, detector=detector, select=select, seed=seed)
    if detector == "stacked":
        assert g.chosen == "stacked"
    else:
        assert g.chosen == p.bases[p.primary] and any(n.startswith("stacked model not taken: ") for n in g.notes)
        assert g.selection["stacked"] == p.selection["stacked"]  # the same comparison, only the rule differs
