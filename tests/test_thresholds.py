"""Threshold versions: the registry API, calibration from captured traffic and labels (against
np.quantile and a brute-force oracle), the CLI, and a running server picking a new threshold version
up without reloading its model."""

from __future__ import annotations

import json
import multiprocessing as mp
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import LoopThread, run_cli
from prometheus_client import CollectorRegistry
from sklearn.ensemble import IsolationForest

from outlierd.core import load_model
from outlierd.core.registry import Registry
from outlierd.monitoring.metrics import ServiceMetrics
from outlierd.monitoring.store import LabelRow, open_store
from outlierd.v1 import scoring_pb2 as pb
from outlierd.v1 import scoring_pb2_grpc as pb_grpc
from outlierd.server.app import start_worker
from outlierd.server.client import request
from outlierd.server.settings import ServeSettings
from outlierd.training import export_sklearn
from outlierd.monitoring.recalibration import alert_rate_threshold, calibrate, precision_threshold, weighted_precision_threshold

D = 6


@pytest.fixture(scope="module")
def data() -> np.ndarray:
    return np.random.default_rng(3).normal(size=(1500, D))


@pytest.fixture(scope="module")
def reg_dir(tmp_path_factory, data) -> Path:
    root = tmp_path_factory.mktemp("thr")
    reg = Registry(root / "reg")
    for seed in (1, 2):
        path = export_sklearn(IsolationForest(n_estimators=20, random_state=seed).fit(data), root / f"src{seed}", X_train=data)
        reg.publish("m", path, aliases=("champion",) if seed == 1 else ())
    return root / "reg"


def _fresh_registry(tmp_path: Path, data: np.ndarray) -> Registry:
    reg = Registry(tmp_path / "reg")
    path = export_sklearn(IsolationForest(n_estimators=10, random_state=0).fit(data), tmp_path / "src", X_train=data)
    reg.publish("m", path, aliases=("champion",))
    return reg


def _capture(store, model, version, X, scores, threshold, rate, rng, role="champion"):
    """What the capture writer stores: every flagged record, each other one with probability ``rate``."""
    flagged = scores >= threshold
    sampled = ~flagged & (rng.random(scores.size) < rate)
    keep = flagged | sampled
    ids = [f"r{version}-{i}" for i in np.flatnonzero(keep)]
    store.add_predictions(model, version, role, ids, X[keep], scores[keep], flagged[keep], sampled[keep], 5.0, sample_rate=rate)
    return ids, keep


# ---------------------------------------------------------------------------------------------
# registry
# ---------------------------------------------------------------------------------------------


def test_threshold_versions_registry(tmp_path, data):
    reg = _fresh_registry(tmp_path, data)
    manifest_before = (reg.path("m", 1) / "manifest.json").read_bytes()
    own = load_model(reg.path("m", 1)).threshold
    assert reg.threshold("m", "champion") == (own, 0)
    assert reg.thresholds("m", 1) == []
    assert reg.publish_threshold("m", "champion", 0.61, {"method": "alert_rate", "target": 0.02}) == 1
    assert reg.publish_threshold("m", 1, 0.57, {"method": "precision", "target": 0.9}) == 2
    assert reg.threshold("m", 1) == (0.57, 2)
    rows = reg.thresholds("m", "champion")
    assert [(r["threshold_version"], r["threshold"], r["method"], r["target"]) for r in rows] == [
        (1, 0.61, "alert_rate", 0.02), (2, 0.57, "precision", 0.9)]
    assert all(r["version"] == 1 and r["time"] for r in rows)
    audit = [r for r in reg.audit("m") if r["action"] == "threshold"]
    assert [(r["threshold_version"], r["threshold"], r["method"]) for r in audit] == [(1, 0.61, "alert_rate"), (2, 0.57, "precision")]
    # the artifact is untouched and still loads (its digest covers its own threshold)
    assert (reg.path("m", 1) / "manifest.json").read_bytes() == manifest_before
    assert load_model(reg.path("m", 1)).threshold == own
    assert reg.versions("m")[0]["version"] == 1 and reg.models() == ["m"]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_threshold_non_finite_refused(tmp_path, data, bad):
    reg = _fresh_registry(tmp_path, data)
    with pytest.raises(ValueError, match="finite"):
        reg.publish_threshold("m", 1, bad)
    with pytest.raises(ValueError, match="set by the registry"):
        reg.publish_threshold("m", 1, 0.5, {"threshold_version": 7})
    assert reg.threshold_version("m", 1) == 0


def _publish_many(root: str, k: int, n: int, out) -> None:
    reg = Registry(root)
    out.put([(reg.publish_threshold("m", 1, 0.5 + k / 100 + i / 10000, {"method": "test", "worker": k}), k, i) for i in range(n)])


def test_concurrent_publishes_get_distinct_monotonic_numbers(tmp_path, data):
    reg = _fresh_registry(tmp_path, data)
    ctx = mp.get_context("spawn" if sys.platform == "darwin" else "fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_publish_many, args=(str(reg.root), k, 6, q)) for k in range(4)]
    for p in procs:
        p.start()
    got = [row for _ in procs for row in q.get(timeout=60)]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    numbers = sorted(n for n, _, _ in got)
    assert numbers == list(range(1, 25))
    for k in range(4):  # each writer saw its own numbers increase
        mine = [n for n, kk, _ in sorted(got, key=lambda r: r[2]) if kk == k]
        assert mine == sorted(mine)
    stored = {r["threshold_version"]: r for r in reg.thresholds("m", 1)}
    for n, k, i in got:  # every file holds what its publisher wrote
        assert stored[n]["threshold"] == pytest.approx(0.5 + k / 100 + i / 10000) and stored[n]["worker"] == k
    assert len([r for r in reg.audit("m") if r["action"] == "threshold"]) == 24


# ---------------------------------------------------------------------------------------------
# calibration
# ---------------------------------------------------------------------------------------------


def test_alert_rate_threshold_unit_weights_is_np_quantile(rng):
    n = int(rng.integers(500, 5000))
    scores = rng.normal(size=n)
    R = float(rng.uniform(0.005, 0.1))
    assert not float(R * n).is_integer()
    t = alert_rate_threshold(scores, np.ones(n), R)
    assert t == np.quantile(scores, 1 - R, method="inverted_cdf")
    assert np.count_nonzero(scores >= t) == int(np.ceil(R * n))


def test_alert_rate_calibration_on_captured_traffic(tmp_path, reg_dir, rng):
    reg = Registry(reg_dir)
    model = load_model(reg.path("m", 1))
    X = rng.normal(size=(40_000, D)) * rng.uniform(0.8, 1.6, size=(40_000, 1))
    scores = model.score(X)
    rate = 0.125  # 1/8 exactly: every sampled record stands for 8
    store = open_store(tmp_path / "fb.sqlite")
    _capture(store, "m", 1, X, scores, model.threshold, rate, rng)
    R = float(rng.uniform(0.01, 0.2))
    cal = calibrate(reg, store, "m", "champion", alert_rate=R)
    # reference: np.quantile over the captures expanded by their weights (flagged x1, sampled x8)
    p = store.predictions("m", version=1, features=False)
    expanded = np.concatenate([p.score[p.flagged], np.repeat(p.score[p.sampled], 8)])
    assert not float(R * expanded.size).is_integer()
    assert cal.threshold == np.quantile(expanded, 1 - R, method="inverted_cdf")
    assert cal.estimated_alert_rate == pytest.approx(np.mean(expanded >= cal.threshold))
    # and on the live traffic the captures stand for, the alert rate is the requested one
    sigma = np.sqrt(R * (1 - R) / (rate * scores.size))
    assert abs(np.mean(scores >= cal.threshold) - R) < 5 * sigma + 1e-3
    assert abs(cal.threshold - np.quantile(scores, 1 - R)) < 0.05
    assert cal.method == "alert_rate" and cal.records == len(p) and cal.sampled == int(p.sampled.sum())
    assert cal.previous == model.threshold and cal.previous_threshold_version == 0
    store.close()


def _brute_precision(scores: np.ndarray, y: np.ndarray, P: float, w: np.ndarray | None = None, min_support: int = 1) -> float | None:
    """The lowest threshold whose (weighted) precision over the records at or above it reaches P."""
    w = np.ones(scores.size) if w is None else w
    best = None
    for t in sorted(set(scores.tolist())):
        sel = scores >= t
        if sel.sum() >= min_support and (w[sel] * y[sel]).sum() / w[sel].sum() >= P - 1e-12 and (best is None or t < best):
            best = t
    return best


def test_weighted_precision_threshold_against_brute_force(rng):
    for _ in range(20):
        n = int(rng.integers(30, 300))
        scores = np.round(rng.normal(size=n), 1)  # ties on purpose
        y = rng.random(n) < 1 / (1 + np.exp(-3 * scores))
        w = np.where(rng.random(n) < 0.5, 1.0, rng.uniform(1, 50, size=n))
        P, support = float(rng.uniform(0.5, 0.95)), int(rng.integers(1, 20))
        ref = _brute_precision(scores, y, P, w, support)
        if ref is None:
            with pytest.raises(ValueError, match="not reachable"):
                weighted_precision_threshold(scores, y, w, P, support)
            continue
        t, prec, k, (lo, hi) = weighted_precision_threshold(scores, y, w, P, support)
        sel = scores >= t
        assert t == ref and k == int(sel.sum()) >= support
        assert prec == pytest.approx((w[sel] * y[sel]).sum() / w[sel].sum()) and lo <= prec <= hi


def test_precision_threshold_against_brute_force(rng):
    for _ in range(20):
        n = int(rng.integers(30, 300))
        scores = np.round(rng.normal(size=n), 1)  # ties on purpose
        y = rng.random(n) < 1 / (1 + np.exp(-3 * scores))
        P = float(rng.uniform(0.5, 0.95))
        ref = _brute_precision(scores, y, P)
        if ref is None:
            with pytest.raises(ValueError, match="not reachable"):
                precision_threshold(scores, y, P)
            continue
        t, prec, k = precision_threshold(scores, y, P)
        assert t == ref
        assert prec == pytest.approx(y[scores >= t].mean()) and k == int(np.count_nonzero(scores >= t))


def test_precision_calibration_from_labels(tmp_path, reg_dir, rng):
    reg = Registry(reg_dir)
    model = load_model(reg.path("m", 2))
    X = rng.normal(size=(6000, D)) * rng.uniform(0.8, 2.0, size=(6000, 1))
    scores = model.score(X)
    store = open_store(tmp_path / "fb.sqlite")
    ids, keep = _capture(store, "m", 2, X, scores, model.threshold, 0.05, rng, role="challenger")
    s = scores[keep]
    # reviewers: anomalies more likely at high scores; a few relabelled (the latest label wins)
    truth = rng.random(s.size) < 1 / (1 + np.exp(-40 * (s - model.threshold)))
    rows = [LabelRow(rid, "anomaly" if a else "normal", "rev1") for rid, a in zip(ids, truth)]
    flip = rng.choice(len(ids), size=len(ids) // 20, replace=False)
    truth[flip] = ~truth[flip]
    rows += [LabelRow(ids[i], "anomaly" if truth[i] else "normal", "rev2") for i in flip]
    rows.append(LabelRow("never-captured", "anomaly"))
    store.add_labels("m", rows)
    P = 0.8
    # every captured record is labelled: a record's weight is its capture weight (1 flagged, 1 / 0.05 sampled)
    w = np.where(s >= model.threshold, 1.0, 1 / 0.05)
    ref = _brute_precision(s, truth, P, w, min_support=20)
    assert ref is not None
    cal = calibrate(reg, store, "m", 2, precision=P)
    assert cal.threshold == ref and cal.method == "precision" and cal.labelled == len(ids)
    sel = s >= ref
    assert cal.precision == pytest.approx((w[sel] * truth[sel]).sum() / w[sel].sum())
    assert cal.precision_ci[0] <= cal.precision <= cal.precision_ci[1]
    # relabelled: 6 anomalies in the lower half of the scores, the rest normal: 0.99 is out of reach
    low = np.flatnonzero(s < np.median(s))
    anomalies = set(rng.choice(low, size=6, replace=False).tolist())
    store.add_labels("m", [LabelRow(rid, "anomaly" if i in anomalies else "normal", "rev3") for i, rid in enumerate(ids)])
    y = np.array([i in anomalies for i in range(len(ids))])
    assert _brute_precision(s, y, 0.99) is None
    with pytest.raises(ValueError, match="not reachable"):
        calibrate(reg, store, "m", 2, precision=0.99)
    store.add_labels("m", [LabelRow(rid, "normal", "rev4") for rid in ids])
    with pytest.raises(ValueError, match="not enough labelled anomalies"):
        calibrate(reg, store, "m", 2, precision=0.5)
    store.close()


def test_calibration_errors(tmp_path, reg_dir, rng):
    reg = Registry(reg_dir)
    store = open_store(tmp_path / "fb.sqlite")
    with pytest.raises(ValueError, match="no captured predictions"):
        calibrate(reg, store, "m", alert_rate=0.01)
    model = load_model(reg.path("m", 1))
    X = rng.normal(size=(300, D))
    _capture(store, "m", 1, X, model.score(X), model.threshold, 0.1, rng)
    with pytest.raises(ValueError, match="not enough captured traffic"):
        calibrate(reg, store, "m", alert_rate=0.001)
    with pytest.raises(ValueError, match="not enough labels"):
        calibrate(reg, store, "m", precision=0.9)
    with pytest.raises(ValueError, match="exactly one"):
        calibrate(reg, store, "m", alert_rate=0.1, precision=0.9)
    with pytest.raises(ValueError, match=r"in \(0, 1\)"):
        calibrate(reg, store, "m", alert_rate=float("nan"))
    store.close()


def test_cli_calibrate_and_list(tmp_path, data, rng):
    reg = _fresh_registry(tmp_path, data)
    model = load_model(reg.path("m", 1))
    X = rng.normal(size=(8000, D)) * 1.3
    store = open_store(reg.root / "feedback.sqlite")
    _capture(store, "m", 1, X, model.score(X), model.threshold, 0.2, rng)
    store.close()
    common = ["--registry", str(reg.root), "--model", "m"]
    dry = run_cli("threshold", "calibrate", *common, "--alert-rate", "0.05", "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    out = json.loads(dry.stdout)
    assert out["published"] is False and reg.threshold_version("m", 1) == 0
    done = run_cli("threshold", "calibrate", *common, "--alert-rate", "0.05")
    assert done.returncode == 0, done.stderr
    assert "published as threshold version 1" in done.stdout
    assert reg.threshold("m", 1) == (pytest.approx(out["threshold"]), 1)
    listed = run_cli("threshold", "list", *common, "--json")
    rows = json.loads(listed.stdout)
    assert rows["in_force"] == 1 and [r["threshold_version"] for r in rows["thresholds"]] == [0, 1]
    assert rows["thresholds"][1]["method"] == "alert_rate" and rows["thresholds"][1]["target"] == 0.05
    # errors: one line, exit 2
    for args, msg in ((("--alert-rate", "1.5"), "must be in (0, 1)"), (("--precision", "0.9"), "not enough labels"),
                      (("--alert-rate", "0.05", "--feedback-store", str(tmp_path / "none.sqlite")), "no feedback store")):
        bad = run_cli("threshold", "calibrate", *common, *args)
        assert bad.returncode == 2 and msg in bad.stderr and "Traceback" not in bad.stderr, bad.stderr


def test_cli_precision_is_not_overstated_by_labels_on_alerts(tmp_path, data, rng):
    # Reviewers label every alert but only some of the 1% sample of the rest: over the labelled
    # records, precision below the alert threshold looks far better than it is on the traffic.
    # The calibrated threshold's precision on the whole traffic (ground truth known here) must
    # meet the target within its interval; plain precision over the labels misses it badly.
    reg = _fresh_registry(tmp_path, data)
    model = load_model(reg.path("m", 1))
    X = rng.normal(size=(60_000, D)) * rng.uniform(0.9, 1.6, size=(60_000, 1))
    scores = model.score(X)
    t0 = float(np.quantile(scores, 0.98))  # the threshold in force flags 2% of the traffic
    reg.publish_threshold("m", 1, t0)
    truth = rng.random(scores.size) < 0.9 / (1 + np.exp(-60 * (scores - t0)))
    store = open_store(reg.root / "feedback.sqlite")
    ids, keep = _capture(store, "m", 1, X, scores, t0, 0.01, rng)
    s, y = scores[keep], truth[keep]
    flagged = s >= t0
    labelled = flagged | (rng.random(s.size) < 0.6)  # every alert, 60% of the sampled others
    store.add_labels("m", [LabelRow(ids[i], "anomaly" if y[i] else "normal") for i in np.flatnonzero(labelled)])
    store.close()
    common = ["--registry", str(reg.root), "--model", "m"]
    P = 0.3
    res = run_cli("threshold", "calibrate", *common, "--precision", str(P), "--dry-run", "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    t = out["threshold"]
    real = truth[scores >= t].mean()
    lo, hi = out["precision_ci"]
    assert lo - 0.05 <= real <= hi + 0.05 and real > 0.2, (real, out)
    assert out["estimated_alert_rate"] == pytest.approx((scores >= t).mean(), rel=0.35)
    # what plain precision over the labelled records would have chosen: far below the target on the traffic
    t_plain, _, _ = precision_threshold(s[labelled], y[labelled], P)
    assert truth[scores >= t_plain].mean() < 0.6 * P and t_plain < t, (truth[scores >= t_plain].mean(), real)

    # a target that the labels put far below the current threshold's alert rate: refused unless --force
    res = run_cli("threshold", "calibrate", *common, "--precision", "0.05")
    assert res.returncode == 2 and "not published" in res.stderr and "--force" in res.stderr, res.stderr
    assert reg.threshold_version("m", 1) == 1
    shown = run_cli("threshold", "calibrate", *common, "--precision", "0.05", "--dry-run")
    assert shown.returncode == 0 and "refused unless --force" in shown.stdout and "dry run: nothing published" in shown.stdout
    forced = run_cli("threshold", "calibrate", *common, "--precision", "0.05", "--force")
    assert forced.returncode == 0 and "published as threshold version 2" in forced.stdout, forced.stderr
    # and the way back: threshold version 1 in force again, as version 3
    back = run_cli("threshold", "use", *common, "1")
    assert back.returncode == 0 and "published again as threshold version 3" in back.stdout, back.stderr
    assert reg.threshold("m", 1) == (pytest.approx(t0), 3)
    missing = run_cli("threshold", "use", *common, "9")
    assert missing.returncode == 2 and "has no threshold version 9" in missing.stderr


# ---------------------------------------------------------------------------------------------
# a running server picks a threshold version up, without reloading the model
# ---------------------------------------------------------------------------------------------


def test_server_picks_up_threshold_version(tmp_path, data, rng):
    reg = _fresh_registry(tmp_path, data)
    model = load_model(reg.path("m", 1))
    lt = LoopThread()
    cr = CollectorRegistry()
    metrics = ServiceMetrics(cr)
    metrics.registry = cr  # the rollout metrics (thresholds in force) register beside the service's
    settings = ServeSettings(registry=reg.root, model="m", host="127.0.0.1", port=0, capture=0)
    worker = lt.call(start_worker(settings, metrics))
    try:
        loaded = worker.slot.current.model
        X = rng.normal(size=(300, D)) * 1.5
        expected = model.score(X)
        with grpc.insecure_channel(f"127.0.0.1:{worker.port}") as ch:
            stub = pb_grpc.ScorerStub(ch)
            before = stub.Score(request(X), timeout=10)
            assert list(before.anomalous) == (expected >= model.threshold).tolist()
            assert stub.GetModelInfo(pb.ModelInfoRequest(), timeout=5).threshold == model.threshold
            new = float(np.quantile(expected, 0.7))  # flags ~30%: clearly different flags
            assert (expected >= new).sum() != (expected >= model.threshold).sum()
            t0 = time.monotonic()
            assert reg.publish_threshold("m", 1, new, {"method": "test"}) == 1
            while stub.GetModelInfo(pb.ModelInfoRequest(), timeout=5).threshold != new:
                assert time.monotonic() - t0 < 3.0, "threshold version not picked up"
                time.sleep(0.02)
            seen = time.monotonic() - t0
            after = stub.Score(request(X), timeout=10)
            np.testing.assert_allclose(after.scores, expected, atol=1e-6)
            assert list(after.anomalous) == (expected >= new).tolist()
            assert after.version == "1"
        handle = worker.slot.current
        assert handle.model is loaded  # same loaded model: no reload
        assert handle.threshold_version == 1 and handle.threshold == new
        assert seen <= 1.5, seen  # one 250 ms tick, plus scheduling on a loaded box
        time.sleep(0.4)  # the next tick exports it
        assert cr.get_sample_value("outlierd_threshold_version", {"model": "m", "alias": "champion"}) == 1
        assert cr.get_sample_value("outlierd_threshold", {"model": "m", "alias": "champion"}) == new
        assert cr.get_sample_value("outlierd_model_reloads_total", {"model": "m", "result": "ok"}) == 0
    finally:
        lt.call(worker.stop(1.0))
        lt.close()
