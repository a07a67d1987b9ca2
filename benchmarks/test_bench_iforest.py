"""Isolation Forest: outlierd vs scikit-learn vs ONNX Runtime on the same forest and data.

Same model everywhere: one sklearn ``IsolationForest`` (100 trees, max_samples=256) fitted on random
float32 data; ours is its artifact (``export_sklearn`` -> ``load_model``), ONNX Runtime runs its
skl2onnx conversion. Same data everywhere: ``OUTLIERD_BENCH_ROWS`` x 32 float32 rows.

Scores compared: outlierd's ``Model.score`` == ``-forest.score_samples`` (atol 1e-6). skl2onnx's
``scores`` output is sklearn's ``decision_function`` (``score_samples - offset_``, float32), so
``-(scores + offset_)`` is compared to ``-score_samples`` (atol 1e-4); the timed call is the bare
``session.run`` (the O(n) sign/offset conversion is not timed).
"""

from __future__ import annotations

import numpy as np
import pytest
from joblib import parallel_backend

CHECK_ROWS = 65_536   # rows checked before timing the slow ONNX peer (all rows are checked after)


def ours_name(settings, latency: bool = False) -> str:
    return f"outlierd Model.score (Numba, {'serial kernel' if latency else f'{settings.numba_threads} threads'})"


def sklearn_name(settings, latency: bool = False) -> str:
    return "scikit-learn score_samples (sequential)" if latency else \
        f"scikit-learn score_samples (threading, n_jobs={settings.n_threads})"


def onnx_name(settings) -> str:
    return f"ONNX Runtime CPU, skl2onnx graph (intra_op={settings.n_threads})"


def _latency_group(rows: int) -> str:
    return f"iforest-latency-{rows}row{'s' if rows > 1 else ''}"


# --------------------------------------------------------------------------------------------
# Throughput on all rows
# --------------------------------------------------------------------------------------------


@pytest.mark.benchmark(group="iforest-throughput")
def test_iforest_throughput_outlierd(benchmark, record, settings, iforest_model, sk_reference, bench_data):
    X, atol = bench_data.X, settings.iforest_atol
    np.testing.assert_allclose(iforest_model.score(X), sk_reference, rtol=0, atol=atol)  # also the JIT warm-up
    out = benchmark.pedantic(iforest_model.score, args=(X,), rounds=settings.fast_rounds, iterations=1)
    np.testing.assert_allclose(out, sk_reference, rtol=0, atol=atol)
    record(benchmark, name=ours_name(settings), role="ours", metric="throughput", rows=X.shape[0])


@pytest.mark.benchmark(group="iforest-throughput")
def test_iforest_throughput_sklearn(benchmark, record, settings, sk_forest, sk_reference, iforest_model, bench_data):
    X = bench_data.X
    # sk_reference is exactly the call timed below (same forest, data and backend): check that ours agrees.
    np.testing.assert_allclose(iforest_model.score(X), sk_reference, rtol=0, atol=settings.iforest_atol)
    with parallel_backend("threading", n_jobs=settings.n_threads):
        out = benchmark.pedantic(sk_forest.score_samples, args=(X,), rounds=settings.slow_rounds, iterations=1)
    # threaded sklearn sums per-job depths in completion order: equal up to a few ulps run to run
    np.testing.assert_allclose(-out, sk_reference, rtol=0, atol=1e-12)
    record(benchmark, name=sklearn_name(settings), role="peer", metric="throughput", rows=X.shape[0])


@pytest.mark.benchmark(group="iforest-throughput")
def test_iforest_throughput_onnxruntime(benchmark, record, settings, onnx_forest, sk_reference, bench_data):
    X, atol = bench_data.X, settings.onnx_atol
    k = min(CHECK_ROWS, X.shape[0])
    # check (and warm up) on a prefix, a full call being ~10 s at 1M rows; the full output is checked after.
    np.testing.assert_allclose(onnx_forest.to_outlierd(onnx_forest.run(X[:k])), sk_reference[:k], rtol=0, atol=atol)
    out = benchmark.pedantic(onnx_forest.run, args=(X,), rounds=settings.slow_rounds, iterations=1)
    np.testing.assert_allclose(onnx_forest.to_outlierd(out), sk_reference, rtol=0, atol=atol)
    record(benchmark, name=onnx_name(settings), role="peer", metric="throughput", rows=X.shape[0])


# --------------------------------------------------------------------------------------------
# Per-call latency (median) for 1 and 64 rows
# --------------------------------------------------------------------------------------------

LATENCY_ROWS = pytest.mark.parametrize("rows", [1, 64], ids=["1row", "64rows"])


@LATENCY_ROWS
def test_iforest_latency_outlierd(benchmark, record, settings, iforest_model, sk_forest, bench_data, rows):
    benchmark.group = _latency_group(rows)
    x = bench_data.X[:rows]
    np.testing.assert_allclose(iforest_model.score(x), -sk_forest.score_samples(x), rtol=0, atol=settings.iforest_atol)
    benchmark(iforest_model.score, x)
    record(benchmark, name=ours_name(settings, latency=True), role="ours", metric="latency", rows=rows)


@LATENCY_ROWS
def test_iforest_latency_sklearn(benchmark, record, settings, iforest_model, sk_forest, bench_data, rows):
    # sklearn's default (sequential) is its fastest setting for small batches: the threading backend
    # costs about 3x more per call here, so it would flatter us.
    benchmark.group = _latency_group(rows)
    x = bench_data.X[:rows]
    np.testing.assert_allclose(iforest_model.score(x), -sk_forest.score_samples(x), rtol=0, atol=settings.iforest_atol)
    benchmark(sk_forest.score_samples, x)
    record(benchmark, name=sklearn_name(settings, latency=True), role="peer", metric="latency", rows=rows)


@LATENCY_ROWS
def test_iforest_latency_onnxruntime(benchmark, record, settings, onnx_forest, sk_forest, bench_data, rows):
    benchmark.group = _latency_group(rows)
    x = bench_data.X[:rows]
    np.testing.assert_allclose(onnx_forest.to_outlierd(onnx_forest.run(x)), -sk_forest.score_samples(x), rtol=0,
                               atol=settings.onnx_atol)
    benchmark(onnx_forest.run, x)
    record(benchmark, name=onnx_name(settings), role="peer", metric="latency", rows=rows)
