"""Drift detection on seeded streams with known change points, a stationary stream of 1,000,000
records, the statistics against float64 oracles, and merging across processes."""

import numpy as np
import pytest
from scipy.stats import binomtest
from sklearn.ensemble import IsolationForest

from outlierd.core import load_model
from outlierd.monitoring.drift import DriftConfig, Reference, Window, evaluate, observe, psi, reference_for, wasserstein_binned
from outlierd.monitoring.stream import StreamMonitor, merge_dir
from outlierd.training import export_sklearn

D = 5
WINDOW = 10_000
COV = np.eye(D)
COV[0, 1] = COV[1, 0] = 0.9  # x0 and x1 move together in the reference


def _draw(rng, n):
    return rng.multivariate_normal(np.zeros(D), COV, size=n)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    rng = np.random.default_rng(2024)
    X = _draw(rng, 20_000)
    forest = IsolationForest(n_estimators=50, random_state=0).fit(X)
    m = load_model(export_sklearn(forest, tmp_path_factory.mktemp("m") / "a", X_train=X))
    scores = m.score(X)
    m.metrics["train_alert_rate"] = float(np.mean(scores >= m.threshold))
    return m


def _run(model, stream, n_windows):
    """Feed ``stream(i, rng)`` window by window (in 1,000-record batches); return each window's result."""
    ref = reference_for(model)
    results = []
    mon = StreamMonitor(ref, DriftConfig(), pane_records=WINDOW, window_panes=1, on_window=lambda r, w: results.append(r))
    rng = np.random.default_rng(99)
    for i in range(n_windows * WINDOW // 1000):
        X = stream(i * 1000, rng)
        mon.observe(X, model.score(X), model.threshold)
    return results


def _first_drift(results, feature):
    for k, r in enumerate(results):
        if r.features[feature].state == 2:
            return k
    return None


CHANGE = 45_000  # mid-window 4 (windows of 10,000 records: 0..9)


def _mean_shift(start, rng):
    X = _draw(rng, 1000)
    if start >= CHANGE:
        X[:, 2] += 1.0
    return X


def _variance_change(start, rng):
    X = _draw(rng, 1000)
    if start >= CHANGE:
        X[:, 3] *= 2.0
    return X


def _spike(start, rng):
    X = _draw(rng, 1000)
    if start >= CHANGE:
        X[rng.random(1000) < 0.3, 4] = 0.05  # a category-like value takes 30% of the records
    return X


def _decorrelate(start, rng):
    X = _draw(rng, 1000)
    if start >= CHANGE:
        X[:, 1] = -X[:, 1]  # same marginals, broken joint structure: only the scores see it
    return X


@pytest.mark.parametrize("stream,feature", [(_mean_shift, 2), (_variance_change, 3), (_spike, 4)])
def test_feature_drift_detected_within_two_windows_on_the_right_feature(model, stream, feature):
    results = _run(model, stream, 8)
    assert len(results) == 8
    first = _first_drift(results, feature)
    assert first in (4, 5), [r.features[feature].psi for r in results]  # change in window 4
    for k, r in enumerate(results):
        states = [f.state for f in r.features]
        others = [s for j, s in enumerate(states) if j != feature]
        assert max(others) == 0, (k, states)  # no other feature drifts, or even warns
        if k < 4:
            assert states[feature] == 0, (k, r.features[feature].psi)
        if k >= 5:
            assert states[feature] == 2


def test_score_distribution_shift_detected_by_ks(model):
    results = _run(model, _decorrelate, 8)
    ks = [r.score_ks for r in results]
    drifted = [r.score_drift for r in results]
    assert drifted.index(True) in (4, 5), ks
    assert not any(drifted[:4]) and all(drifted[5:]), ks
    assert all(f.state == 0 for r in results for f in r.features)  # marginals unchanged


def test_stationary_million_records_raise_no_drift(model):
    results = _run(model, lambda start, rng: _draw(rng, 1000), 100)
    assert len(results) == 100 and sum(r.records for r in results) == 1_000_000
    assert max(f.state for r in results for f in r.features) == 0
    assert max(f.psi for r in results for f in r.features) < DriftConfig().psi_warn / 2
    assert not any(r.score_drift for r in results)
    assert not any(r.alert_rate_shift for r in results)


def test_alert_rate_shift_uses_an_exact_binomial_test(model):
    def burst(start, rng):
        X = _draw(rng, 1000)
        if start >= CHANGE:
            X[:50] *= 6.0  # 5% more records far out
        return X

    results = _run(model, burst, 7)
    shifts = [r.alert_rate_shift for r in results]
    assert shifts[:4] == [False] * 4 and shifts[5:] == [True] * 2, shifts  # window 4 holds the change
    r = results[6]
    k = round(r.alert_rate * r.records)
    assert r.alert_rate_p == pytest.approx(binomtest(k, r.records, r.expected_alert_rate).pvalue)


def test_statistics_against_float64_oracles(rng):
    for _ in range(20):
        k = int(rng.integers(2, 15))
        a, b = rng.dirichlet(np.ones(k)), rng.dirichlet(np.ones(k))
        a[rng.integers(k)] = 0.0
        a = a / a.sum()
        ca, cb = np.maximum(a, 1e-4), np.maximum(b, 1e-4)
        assert psi(a, b) == pytest.approx(sum((x - y) * np.log(x / y) for x, y in zip(ca, cb)), rel=1e-12)
        edges = np.sort(rng.normal(size=k - 1))
        # W1 by brute force: CDFs of both histograms on a fine grid between the inner edges
        grid = np.linspace(edges[0], edges[-1], 200_001)[:-1]
        fa = np.cumsum(a)[np.searchsorted(edges, grid, side="right") - 1] if k > 2 else None
        fb = np.cumsum(b)[np.searchsorted(edges, grid, side="right") - 1] if k > 2 else None
        if k > 2:
            brute = np.abs(fa - fb).mean()
            assert wasserstein_binned(a, b, edges) == pytest.approx(brute, rel=1e-3, abs=1e-6)


def test_bins_follow_the_reference_convention(model, rng):
    ref = reference_for(model)
    X = _draw(rng, 5000)
    X[rng.random(X.shape) < 0.01] = np.nan
    w = Window.empty(ref)
    observe(w, ref, X, model.score(X), model.threshold)
    for j in range(D):
        k = int(ref.n_bins[j])
        col = X[:, j][~np.isnan(X[:, j])]
        expected = np.bincount(np.searchsorted(ref.edges[j, : k - 1], col, side="left"), minlength=k)
        assert np.array_equal(w.counts[j, :k], expected)
        assert w.missing[j] == np.isnan(X[:, j]).sum()


def test_merged_workers_equal_one_process(model, rng, tmp_path):
    ref = reference_for(model)
    batches = [_draw(rng, int(rng.integers(1, 3000))) for _ in range(30)]
    one = StreamMonitor(ref, pane_records=7_000, window_panes=3)
    workers = [StreamMonitor(ref, pane_seconds=10.0, window_panes=3, share_dir=tmp_path / f"w{i}", clock=lambda: 5.0) for i in range(3)]
    for i in range(3):
        (tmp_path / f"w{i}").mkdir()
    whole = Window.empty(ref)
    for i, X in enumerate(batches):
        s = model.score(X)
        observe(whole, ref, X, s, model.threshold)
        workers[i % 3].observe(X, s, model.threshold)
        one.observe(X, s, model.threshold)
    # close every worker's pane at the same time boundary, as the clock moves on
    for w in workers:
        w.clock = lambda: 15.0
        w.tick()
    shared = tmp_path / "shared"
    shared.mkdir()
    for i in range(3):
        src = next((tmp_path / f"w{i}").glob("drift-*.npz"))
        src.rename(shared / f"drift-{i}.npz")
    merged = merge_dir(shared, ref, 3)
    for a, b in ((merged.counts, whole.counts), (merged.missing, whole.missing), (merged.quality, whole.quality),
                 (merged.score_counts, whole.score_counts)):
        assert np.array_equal(a, b)
    assert (merged.records, merged.alerts) == (whole.records, whole.alerts)
    assert evaluate(merged, ref).summary() == evaluate(whole, ref).summary()


def test_empty_reference_is_refused():
    with pytest.raises(ValueError, match="reference profile is empty"):
        Reference.from_profile({})


def test_serving_monitor_threads_count_every_record_once(model, rng):
    import threading

    from outlierd.monitoring.stream import ServingMonitor

    ref = reference_for(model)
    mon = ServingMonitor("m", ref, None, pane_seconds=3600.0, window_panes=1)
    batches = [_draw(rng, 500) for _ in range(40)]
    for X in batches[:3]:
        X[:5, 1] = np.nan
    whole = Window.empty(ref)
    scored = [(X, model.score(X)) for X in batches]
    for X, s in scored:
        observe(whole, ref, X, s, model.threshold)

    def work(part):
        for X, s in part:
            mon.observe(X, s, model.threshold)

    threads = [threading.Thread(target=work, args=(scored[i::2],)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    mon.tick()  # folds the threads' counts into the pane
    pane = mon.stream.pane
    assert np.array_equal(pane.counts, whole.counts) and np.array_equal(pane.quality, whole.quality)
    assert (pane.records, pane.alerts) == (whole.records, whole.alerts)
    assert np.array_equal(mon.stream.quality_total, whole.quality)
