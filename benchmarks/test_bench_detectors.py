"""robust z and HBOS: outlierd's ``Model.score`` vs a float64 NumPy vectorised implementation of
the same formula (the peer), on the same ``OUTLIERD_BENCH_ROWS`` x 32 float32 rows.

Both artifacts are written with ``training.export.export_detector`` from parameters fitted on the
benchmark's training set (see conftest) and loaded with ``core.load_model``. Before timing, each
benchmark checks that ours and the NumPy peer agree (rtol 1e-12: they differ only in summation
order).
"""

from __future__ import annotations

import numpy as np
import pytest

NUMPY = "NumPy float64 vectorised (1 thread)"
RTOL, ATOL = 1e-12, 1e-12


def ours_name(settings) -> str:
    return f"outlierd Model.score (Numba, {settings.numba_threads} threads)"


def robust_z_numpy(X: np.ndarray, median: np.ndarray, scale_inv: np.ndarray) -> np.ndarray:
    """``sqrt(mean_j ((x_j - median_j) * scale_inv_j) ** 2)`` in float64, in place where possible."""
    z = X - median            # float32 - float64 -> float64 (n, d)
    z *= scale_inv
    z *= z
    s = z.sum(axis=1)
    s /= X.shape[1]
    return np.sqrt(s, out=s)


def hbos_numpy(X: np.ndarray, lo: np.ndarray, hi: np.ndarray, inv_width: np.ndarray, table: np.ndarray) -> np.ndarray:
    """``sum_j table[j, slot_j(x_j)]``: slot 0 below ``lo``, ``n_bins + 1`` above ``hi``, else
    ``1 + min(floor((x - lo) * inv_width), n_bins - 1)``; float64."""
    d = X.shape[1]
    n_bins = table.shape[1] - 2
    Xd = X.astype(np.float64)
    pos = Xd - lo
    pos *= inv_width
    np.minimum(pos, n_bins - 1, out=pos)
    slot = pos.astype(np.intp)    # truncation == floor for x >= lo; the others are overwritten
    slot += 1
    slot[Xd < lo] = 0
    slot[Xd > hi] = n_bins + 1
    slot += np.arange(d, dtype=np.intp) * (n_bins + 2)   # flat index into table
    return table.ravel().take(slot).sum(axis=1)


def _check(ours: np.ndarray, peer: np.ndarray) -> None:
    assert ours.dtype == np.float64 and ours.shape == peer.shape
    np.testing.assert_allclose(ours, peer, rtol=RTOL, atol=ATOL)


# --------------------------------------------------------------------------------------------
# robust z (combine = rms)
# --------------------------------------------------------------------------------------------


@pytest.mark.benchmark(group="robust_z-throughput")
def test_robust_z_throughput_outlierd(benchmark, record, settings, robust_z_model, robust_z_params, bench_data):
    X, p = bench_data.X, robust_z_params
    _check(robust_z_model.score(X), robust_z_numpy(X, p.median, p.scale_inv))
    benchmark.pedantic(robust_z_model.score, args=(X,), rounds=settings.fast_rounds, iterations=1)
    record(benchmark, name=ours_name(settings), role="ours", metric="throughput", rows=X.shape[0])


@pytest.mark.benchmark(group="robust_z-throughput")
def test_robust_z_throughput_numpy(benchmark, record, settings, robust_z_model, robust_z_params, bench_data):
    X, p = bench_data.X, robust_z_params
    _check(robust_z_model.score(X), robust_z_numpy(X, p.median, p.scale_inv))
    benchmark.pedantic(robust_z_numpy, args=(X, p.median, p.scale_inv), rounds=settings.slow_rounds, iterations=1)
    record(benchmark, name=NUMPY, role="peer", metric="throughput", rows=X.shape[0])


# --------------------------------------------------------------------------------------------
# HBOS
# --------------------------------------------------------------------------------------------


@pytest.mark.benchmark(group="hbos-throughput")
def test_hbos_throughput_outlierd(benchmark, record, settings, hbos_model, hbos_params, bench_data):
    X, p = bench_data.X, hbos_params
    _check(hbos_model.score(X), hbos_numpy(X, p.lo, p.hi, p.inv_width, p.table))
    benchmark.pedantic(hbos_model.score, args=(X,), rounds=settings.fast_rounds, iterations=1)
    record(benchmark, name=ours_name(settings), role="ours", metric="throughput", rows=X.shape[0])


@pytest.mark.benchmark(group="hbos-throughput")
def test_hbos_throughput_numpy(benchmark, record, settings, hbos_model, hbos_params, bench_data):
    X, p = bench_data.X, hbos_params
    _check(hbos_model.score(X), hbos_numpy(X, p.lo, p.hi, p.inv_width, p.table))
    benchmark.pedantic(hbos_numpy, args=(X, p.lo, p.hi, p.inv_width, p.table), rounds=settings.slow_rounds, iterations=1)
    record(benchmark, name=NUMPY, role="peer", metric="throughput", rows=X.shape[0])
