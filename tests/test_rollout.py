"""Champion / challenger rollout: the split router, shadow and split modes against a real server on
127.0.0.1, the comparison against NumPy / SciPy references, promotion gates and rollback."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import ROOT, LoopThread, run_cli
from prometheus_client import CollectorRegistry
from scipy.stats import spearmanr
from sklearn.ensemble import IsolationForest

from outlierd.core import load_model
from outlierd.core.registry import Registry
from outlierd.monitoring.metrics import ServiceMetrics
from outlierd.monitoring.store import LabelRow, open_store
from outlierd.v1 import scoring_pb2 as pb
from outlierd.v1 import scoring_pb2_grpc as pb_grpc
from outlierd.server.app import start_worker
from outlierd.server.client import request
from outlierd.server.rollout import challenger_mask, route_point, split_key, to_challenger
from outlierd.server.settings import ServeSettings
from outlierd.training import export_sklearn
from outlierd.monitoring.promotion import Gates, champion_history, check_gates, compare, promote, rollback

D = 5


# ---------------------------------------------------------------------------------------------
# the router
# ---------------------------------------------------------------------------------------------


def _ids(rng, n: int) -> list[str]:
    return [f"{rng.integers(1 << 62):x}-{i}" for i in range(n)]


@pytest.mark.parametrize("share", [0.05, 0.1, 0.3, 0.5])
def test_router_share_over_100k_ids(rng, share):
    ids = _ids(rng, 100_000)
    mask = challenger_mask(ids, share)
    assert abs(mask.mean() - share) <= 0.01, mask.mean()
    assert np.array_equal(mask, challenger_mask(ids, share))  # stable per id
    assert all(to_challenger(i, share) == m for i, m in zip(ids[:2000], mask[:2000]))
    # raising the share only adds ids: none of the challenger's ids goes back to the champion
    assert not (mask & ~challenger_mask(ids, min(1.0, share + 0.1))).any()


def test_router_is_stable_across_processes(rng):
    """Python's hash() is salted per process; the router must not be."""
    ids = _ids(rng, 5000)
    digest = hashlib.sha256(np.packbits(challenger_mask(ids, 0.2)).tobytes()).hexdigest()
    code = ("import sys, json, hashlib, numpy as np; from outlierd.server.rollout import challenger_mask; "
            "ids = json.load(sys.stdin); print(hashlib.sha256(np.packbits(challenger_mask(ids, 0.2)).tobytes()).hexdigest())")
    for seed in ("1", "2"):
        out = subprocess.run([sys.executable, "-c", code], input=json.dumps(ids), capture_output=True, text=True, cwd=ROOT,
                             env={**os.environ, "PYTHONHASHSEED": seed}, timeout=60)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == digest


def test_split_key():
    assert split_key(pb.ScoreRequest(ids=["a", "b"], request_id=7)) == "a"
    assert split_key(pb.ScoreRequest(request_id=7)) == "7"
    assert split_key(pb.ScoreRequest(ids=["a"], request_id=7), "request") == "7"
    assert 0.0 <= route_point("a") < 1.0 and route_point("a") == route_point(b"a")


# ---------------------------------------------------------------------------------------------
# against a real server
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reg_dir(tmp_path_factory) -> Path:
    """v1 champion, v2 challenger (same features), v3 with other features (never servable beside v1)."""
    root = tmp_path_factory.mktemp("rollout")
    rng = np.random.default_rng(17)
    X = rng.normal(size=(1500, D))
    reg = Registry(root / "reg")
    for seed in (1, 2):
        path = export_sklearn(IsolationForest(n_estimators=20, random_state=seed).fit(X), root / f"src{seed}", X_train=X)
        reg.publish("m", path)
    X3 = rng.normal(size=(500, D + 2))
    reg.publish("m", export_sklearn(IsolationForest(n_estimators=10, random_state=3).fit(X3), root / "src3", X_train=X3))
    reg.set_alias("m", "champion", 1)
    reg.set_alias("m", "challenger", 2)
    return root / "reg"


@pytest.fixture(scope="module")
def loop_thread():
    lt = LoopThread()
    yield lt
    lt.close()


def _start(loop_thread, reg_dir, store_path, **kw):
    cr = CollectorRegistry()
    metrics = ServiceMetrics(cr)
    assert metrics.registry is cr  # rollout metrics register beside the service's
    kw.setdefault("capture_sample", 1.0)
    settings = ServeSettings(registry=reg_dir, model="m", host="127.0.0.1", port=0, feedback_store=store_path,
                             reload_interval_s=0.1, **kw)
    settings.validate()
    return loop_thread.call(start_worker(settings, metrics)), cr


def _wait(cond, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_shadow_mode(loop_thread, reg_dir, tmp_path, rng):
    reg = Registry(reg_dir)
    m1, m2 = load_model(reg.path("m", 1)), load_model(reg.path("m", 2))
    worker, cr = _start(loop_thread, reg_dir, tmp_path / "fb.sqlite", rollout="shadow")
    try:
        assert worker.rollout.challenger.current.version == 2
        sent: dict[str, np.ndarray] = {}
        with grpc.insecure_channel(f"127.0.0.1:{worker.port}") as ch:
            stub = pb_grpc.ScorerStub(ch)
            msgs = []
            for k in range(30):
                X = (rng.normal(size=(int(rng.integers(1, 40)), D)) * rng.uniform(0.5, 3)).astype(np.float32)
                ids = [f"s{k}-{i}" for i in range(X.shape[0])]
                msgs.append((X, ids))
            for X, ids in msgs[:20]:  # unary
                resp = stub.Score(request(X, ids=ids), timeout=10)
                assert (resp.version, resp.alias) == ("1", "champion")
                np.testing.assert_allclose(resp.scores, m1.score(X), atol=1e-6)
                assert list(resp.anomalous) == (np.asarray(resp.scores) >= m1.threshold).tolist()
                sent.update(zip(ids, X))
            responses = list(stub.ScoreStream(iter([request(X, ids=ids) for X, ids in msgs[20:]]), timeout=20))
            for (X, ids), resp in zip(msgs[20:], responses):
                assert (resp.version, resp.alias, resp.error) == ("1", "champion", "")
                np.testing.assert_allclose(resp.scores, m1.score(X), atol=1e-6)
                sent.update(zip(ids, X))
        total = len(sent)
        _wait(lambda: worker.rollout.shadow.scored >= total, what="shadow scoring")
        assert worker.flush_capture(10)
        store = open_store(tmp_path / "fb.sqlite")
        chal = store.predictions("m", role="challenger")
        champ = store.predictions("m", role="champion")
        assert sorted(chal.record_id) == sorted(sent) == sorted(champ.record_id)  # sample rate 1: all captured, both roles
        assert set(chal.version.tolist()) == {2} and set(champ.version.tolist()) == {1}
        Xc = np.stack([sent[r] for r in chal.record_id])
        np.testing.assert_allclose(chal.score, m2.score(Xc), atol=1e-6)
        assert np.array_equal(chal.flagged, chal.score >= m2.threshold)
        assert np.isfinite(chal.latency_us).all() and (chal.latency_us > 0).all()
        assert cr.get_sample_value("outlierd_rollout_records_total", {"model": "m", "role": "shadow"}) == total
        assert cr.get_sample_value("outlierd_rollout_records_total", {"model": "m", "role": "champion"}) == total
        assert cr.get_sample_value("outlierd_model_info", {"model": "m", "version": "2", "alias": "challenger"}) == 1

        # the comparison of this traffic, against references computed here
        c = compare(reg, store, "m")
        s1 = dict(zip(champ.record_id, champ.score))
        ids = list(chal.record_id)
        a = np.array([s1[r] for r in ids])
        b = chal.score
        fa, fb = a >= m1.threshold, b >= m2.threshold
        assert c.joined == total
        assert c.spearman == pytest.approx(spearmanr(a, b).statistic)
        assert c.agreement == pytest.approx(np.mean(fa == fb)) and c.agreement_joined == pytest.approx(np.mean(fa == fb))
        if (fa | fb).any():
            assert c.jaccard == pytest.approx((fa & fb).sum() / (fa | fb).sum())
        assert c.champion.alert_rate == pytest.approx(fa.mean()) and c.challenger.alert_rate == pytest.approx(fb.mean())
        assert c.alert_rate_diff == pytest.approx(fb.mean() - fa.mean())
        assert np.isfinite(champ.latency_us).all() and c.latency_ratio is not None and c.latency_ratio > 0

        # gates on this traffic: refused, then passed; the server follows the alias; rollback restores
        refused = promote(reg, store, "m", Gates(min_records=total + 1, min_agreement=0.0, min_labelled=None,
                                                 min_precision_gain=None, max_latency_ratio=None))
        assert not refused.promoted and [g.name for g in refused.failed] == ["min_records"]
        assert reg.resolve("m", "champion") == 1
        lenient = Gates(min_records=total, min_agreement=0.0, min_labelled=None, min_precision_gain=None, max_latency_ratio=1e6)
        assert promote(reg, store, "m", lenient).promoted and reg.resolve("m", "champion") == 2
        _wait(lambda: worker.slot.current.version == 2, what="champion reload after promotion")
        assert rollback(reg, "m") == (2, 1)
        _wait(lambda: worker.slot.current.version == 1, what="champion reload after rollback")
        store.close()

        # a challenger with other features is refused; champion traffic goes on; alias removed: champion only
        reg.set_alias("m", "challenger", 3)
        _wait(lambda: cr.get_sample_value("outlierd_model_reloads_total", {"model": "m", "result": "refused"}) == 1,
              what="challenger refusal")
        assert worker.rollout.challenger.current.version == 2
        reg.remove_alias("m", "challenger")
        _wait(lambda: worker.rollout.challenger.current is None, what="challenger off")
        before = worker.rollout.shadow.scored
        with grpc.insecure_channel(f"127.0.0.1:{worker.port}") as ch:
            X = rng.normal(size=(10, D)).astype(np.float32)
            resp = pb_grpc.ScorerStub(ch).Score(request(X, ids=[f"late-{i}" for i in range(10)]), timeout=10)
            np.testing.assert_allclose(resp.scores, m1.score(X), atol=1e-6)
        time.sleep(0.2)
        assert worker.rollout.shadow.scored == before
    finally:
        reg.set_alias("m", "challenger", 2)
        loop_thread.call(worker.stop(1.0))


def test_split_mode(loop_thread, reg_dir, tmp_path, rng):
    reg = Registry(reg_dir)
    models = {1: load_model(reg.path("m", 1)), 2: load_model(reg.path("m", 2))}
    share = 0.3
    worker, cr = _start(loop_thread, reg_dir, tmp_path / "fb.sqlite", rollout="split", split_share=share)
    seen = {"champion": 0, "challenger": 0}
    try:
        with grpc.insecure_channel(f"127.0.0.1:{worker.port}") as ch:
            stub = pb_grpc.ScorerStub(ch)
            for k in range(200):
                X = rng.normal(size=(int(rng.integers(1, 6)), D)).astype(np.float32)
                with_ids = k % 4 != 0
                ids = [f"{rng.integers(1 << 40):x}" for _ in range(X.shape[0])] if with_ids else []
                rid = int(rng.integers(1, 1 << 62))
                resp = stub.Score(request(X, ids=ids, request_id=rid), timeout=10)
                key = ids[0] if with_ids else str(rid)
                alias = "challenger" if to_challenger(key, share) else "champion"
                version = 2 if alias == "challenger" else 1
                assert (resp.alias, resp.version) == (alias, str(version)), k
                np.testing.assert_allclose(resp.scores, models[version].score(X), atol=1e-6)
                assert list(resp.anomalous) == (np.asarray(resp.scores) >= models[version].threshold).tolist()
                seen[alias] += X.shape[0]
        assert seen["challenger"] > 0 and seen["champion"] > 0
        for role, n in seen.items():
            assert cr.get_sample_value("outlierd_rollout_records_total", {"model": "m", "role": role}) == n
        assert worker.flush_capture(10)
        store = open_store(tmp_path / "fb.sqlite")
        assert len(store.predictions("m", role="challenger", version=2, features=False)) == seen["challenger"]
        store.close()
    finally:
        loop_thread.call(worker.stop(1.0))


# ---------------------------------------------------------------------------------------------
# comparison, gates, promotion and rollback on a store filled directly
# ---------------------------------------------------------------------------------------------


def _fill(store, rng, n: int = 2000, challenger_better: bool = True, champ_lat: float = 10.0, chal_lat: float = 12.0):
    """Shadow-like captures of n records (sample rate 0.5) and labels; returns the truth used."""
    ids = [f"r{i}" for i in range(n)]
    s1 = rng.normal(size=n)
    s2 = s1 + 0.3 * rng.normal(size=n)
    good = s2 if challenger_better else s1  # anomalies follow the better model's scores
    y = good + 0.1 * rng.normal(size=n) > np.quantile(good, 0.95)
    f1, f2 = s1 >= np.quantile(s1, 0.95), s2 >= np.quantile(s2, 0.95)
    X = rng.normal(size=(n, D)).astype(np.float32)
    for role, version, s, f, lat in (("champion", 1, s1, f1, champ_lat), ("challenger", 2, s2, f2, chal_lat)):
        sampled = ~f & (rng.random(n) < 0.5)
        keep = f | sampled
        store.add_predictions("m", version, role, [ids[i] for i in np.flatnonzero(keep)], X[keep], s[keep], f[keep], sampled[keep],
                              lat, sample_rate=0.5)
    labelled = np.flatnonzero(f1 | f2)
    store.add_labels("m", [LabelRow(ids[i], "anomaly" if y[i] else "normal", "r") for i in labelled])
    return ids, s1, s2, f1, f2, y


@pytest.fixture
def promo(tmp_path):
    """A fresh registry: v1 champion, v2 challenger (audit: publish, alias moves)."""
    rng = np.random.default_rng(5)
    X = rng.normal(size=(600, D))
    reg = Registry(tmp_path / "reg")
    for seed in (1, 2):
        reg.publish("m", export_sklearn(IsolationForest(n_estimators=8, random_state=seed).fit(X), tmp_path / f"s{seed}", X_train=X))
    reg.set_alias("m", "champion", 1)
    reg.set_alias("m", "challenger", 2)
    return reg, open_store(reg.root / "feedback.sqlite")


def test_compare_and_gates_against_references(promo, rng):
    reg, store = promo
    ids, s1, s2, f1, f2, y = _fill(store, rng)
    c = compare(reg, store, "m")
    assert (c.champion.version, c.challenger.version) == (1, 2)
    # every flagged record is captured; unflagged ones at rate 0.5: N is estimated, disagreements known
    n_est = c.champion.scored_estimate
    assert abs(n_est - len(ids)) < 5 * np.sqrt(len(ids))
    assert c.agreement == pytest.approx(1 - np.count_nonzero(f1 != f2) / n_est)
    assert c.jaccard == pytest.approx((f1 & f2).sum() / (f1 | f2).sum())
    assert c.champion.precision == pytest.approx(y[f1].mean()) and c.challenger.precision == pytest.approx(y[f2].mean())
    assert c.precision_gain == pytest.approx(y[f2].mean() - y[f1].mean())
    assert c.champion.labelled_flagged == f1.sum() and c.challenger.labelled_flagged == f2.sum()
    assert c.latency_ratio == pytest.approx(1.2) and c.champion.latency_p99_us == pytest.approx(10.0)
    chal = store.predictions("m", role="challenger", features=False)
    champ = store.predictions("m", role="champion", features=False)
    joined = sorted(set(chal.record_id) & set(champ.record_id))
    idx = np.array([int(r[1:]) for r in joined])
    assert c.joined == len(joined)
    assert c.spearman == pytest.approx(spearmanr(s1[idx], s2[idx]).statistic)
    results = {g.name: g for g in check_gates(c, Gates())}
    assert all(g.passed for g in results.values()), results
    tight = {g.name: g.passed for g in check_gates(c, Gates(min_agreement=0.999, max_latency_ratio=1.1))}
    assert tight["min_agreement"] is False and tight["max_latency_ratio"] is False and tight["min_precision_gain"] is True
    off = check_gates(c, Gates(min_agreement=None, min_jaccard=None, max_latency_ratio=None, min_records=None, min_labelled=None))
    assert [g.name for g in off] == ["min_precision_gain"]
    # agreement over the traffic says little at a low alert rate: 0.99 with a quarter of the alerts shared fails
    import dataclasses

    lopsided = {g.name: g for g in check_gates(dataclasses.replace(c, agreement=0.99, jaccard=0.28), Gates())}
    assert lopsided["min_agreement"].passed and not lopsided["min_jaccard"].passed
    assert lopsided["min_jaccard"].reason == "0.28 misses 0.5"
    store.close()


def test_promote_passes_then_rollback(promo, rng):
    reg, store = promo
    _fill(store, rng, challenger_better=True)
    res = promote(reg, store, "m")
    assert res.promoted and not res.failed
    assert reg.resolve("m", "champion") == 2
    last = reg.audit("m")[-1]
    assert last["action"] == "promote" and last["promoted"] is True and last["forced"] is False and last["version"] == 2
    assert champion_history(reg, "m") == [1, 2]
    assert rollback(reg, "m") == (2, 1)
    assert reg.resolve("m", "champion") == 1
    assert [r["action"] for r in reg.audit("m")[-2:]] == ["alias", "rollback"]
    with pytest.raises(ValueError, match="no previous champion"):
        rollback(reg, "m")
    store.close()


def test_promote_refused_when_a_gate_fails(promo, rng):
    reg, store = promo
    _fill(store, rng, challenger_better=False, chal_lat=30.0)
    res = promote(reg, store, "m")
    assert not res.promoted
    assert {g.name for g in res.failed} == {"min_precision_gain", "max_latency_ratio"}
    assert reg.resolve("m", "champion") == 1
    last = reg.audit("m")[-1]
    assert last["action"] == "promote" and last["promoted"] is False and sorted(last["failed"]) == ["max_latency_ratio", "min_precision_gain"]
    forced = promote(reg, store, "m", force=True)
    assert forced.promoted and forced.forced and reg.resolve("m", "champion") == 2
    assert reg.audit("m")[-1]["forced"] is True
    store.close()


def test_cli_compare_promote_rollback(promo, rng, tmp_path):
    reg, store = promo
    common = ["--registry", str(reg.root), "--model", "m"]
    nothing = run_cli("compare", *common)
    assert nothing.returncode == 2 and "no captured challenger traffic" in nothing.stderr and "Traceback" not in nothing.stderr
    _fill(store, rng, challenger_better=False)
    store.close()
    out = run_cli("compare", *common, "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["challenger"]["version"] == 2
    refused = run_cli("promote", *common)
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert "gates failed: min_precision_gain" in refused.stdout and reg.resolve("m", "champion") == 1
    gates = tmp_path / "gates.json"
    gates.write_text(json.dumps({"min_precision_gain": -1.0, "min_agreement": 0.5}))
    ok = run_cli("promote", *common, "--gates", str(gates), "--max-latency-ratio", "off", "--json")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    body = json.loads(ok.stdout)
    assert body["promoted"] and "max_latency_ratio" not in {g["name"] for g in body["gates"]}
    assert reg.resolve("m", "champion") == 2
    back = run_cli("rollback", *common)
    assert back.returncode == 0 and "now version 1" in back.stdout and reg.resolve("m", "champion") == 1
    again = run_cli("rollback", *common)
    assert again.returncode == 2 and "no previous champion" in again.stderr
    gates.write_text(json.dumps({"min_precison_gain": 0.1}))
    typo = run_cli("promote", *common, "--gates", str(gates))
    assert typo.returncode == 2 and "unknown gates min_precison_gain" in typo.stderr


def test_shadow_captures_sample_the_same_records_for_both_roles(loop_thread, reg_dir, tmp_path, rng):
    # with a partial sample, champion and challenger must capture the same sampled records, or
    # outlierd compare joins almost nothing but flagged ones
    worker, cr = _start(loop_thread, reg_dir, tmp_path / "fb.sqlite", rollout="shadow", capture_sample=0.2)
    try:
        total = 0
        with grpc.insecure_channel(f"127.0.0.1:{worker.port}") as ch:
            stub = pb_grpc.ScorerStub(ch)
            msgs = []
            for k in range(40):
                X = rng.normal(size=(int(rng.integers(20, 60)), D)).astype(np.float32)
                msgs.append(request(X, ids=[f"q{k}-{i}" for i in range(X.shape[0])], request_id=k))
                total += X.shape[0]
            assert not any(r.error for r in stub.ScoreStream(iter(msgs), timeout=20))
        _wait(lambda: worker.rollout.shadow.scored >= total, what="shadow scoring")
        assert worker.flush_capture(10)
        store = open_store(tmp_path / "fb.sqlite")
        champ, chal = store.predictions("m", role="champion"), store.predictions("m", role="challenger")
        store.close()
        a_ids, b_ids = set(champ.record_id), set(chal.record_id)
        a_sampled = {r for r, s in zip(champ.record_id, champ.sampled) if s}
        b_sampled = {r for r, s in zip(chal.record_id, chal.sampled) if s}
        assert len(a_sampled) > 0.1 * total  # the sample rate was 0.2
        assert a_sampled <= b_ids and b_sampled <= a_ids  # every sampled record was captured for both roles
        assert not (a_ids - a_sampled) & (b_sampled - a_ids)  # (nothing the challenger sampled on its own)
    finally:
        loop_thread.call(worker.stop())
