"""Explanations at a 1% alert rate: ``Model.score_explain(X, top_k=3, flagged_only=True)`` (ours)
vs plain ``Model.score(X)`` (the peer), same model, same ``OUTLIERD_BENCH_ROWS`` x 32 float32 rows,
same run. Target: explaining the flagged records keeps >= 80% of plain scoring's throughput, i.e.
the summary's ratio (ours / peer) >= 0.8.

Ours and the peer are timed in alternating calls (see ``test_explain_flagged_only_vs_score``).
The models are the session's iforest and HBOS artifacts (see conftest), rebuilt with their threshold
at the 99th percentile of the benchmark rows' scores, so that 1% of the rows are flagged. Before
timing, each benchmark checks that ``score_explain``'s scores equal ``score``'s exactly and that
exactly the flagged rows are explained. A third entry, ``score_explain(flagged_only=False)``
(every row explained), shows what the flagged-only path saves.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pytest

ALERT_RATE = 0.01
TOP_K = 3


def _flagging(model: Any, X: np.ndarray) -> Any:
    """``model`` with its threshold at the (1 - ALERT_RATE) quantile of its scores on ``X``."""
    from outlierd.core.artifact import ARRAYS, load_npz
    from outlierd.core.model import build_model

    threshold = float(np.quantile(model.score(X), 1.0 - ALERT_RATE))
    return build_model({**model.manifest, "threshold": threshold}, load_npz(model.path / ARRAYS), path=model.path)


@pytest.fixture(scope="module")
def flagging_models(iforest_model, hbos_model, bench_data, bench_step) -> dict[str, Any]:
    with bench_step(f"thresholds at the {100 * (1 - ALERT_RATE):g}th percentile of the scores"):
        return {"iforest": _flagging(iforest_model, bench_data.X), "hbos": _flagging(hbos_model, bench_data.X)}


def _check(model: Any, X: np.ndarray) -> np.ndarray:
    """``score_explain(flagged_only=True)`` vs ``score``: equal scores, exactly the flagged rows explained."""
    scores, features, contributions = model.score_explain(X, TOP_K, flagged_only=True)
    np.testing.assert_array_equal(scores, model.score(X))
    flagged = scores >= model.threshold
    assert abs(flagged.mean() - ALERT_RATE) < 0.002, flagged.mean()
    assert np.all(features[flagged] >= 0) and np.all(features[~flagged] == -1)
    assert np.all(np.isfinite(contributions[flagged])) and np.all(np.isnan(contributions[~flagged]))
    return scores


def _name(settings: Any, what: str) -> str:
    return f"{what} (Numba, {settings.numba_threads} threads)"


KINDS = pytest.mark.parametrize("kind", ["iforest", "hbos"])


@KINDS
def test_explain_flagged_only_vs_score(benchmark, record_value, settings, flagging_models, bench_data, kind):
    """Ours and the peer timed in alternating calls (score, explain, explain, score, ...): on a
    shared machine, load that comes and goes then hits both alike. Each is stored with its median;
    pytest-benchmark's own table shows the pairs."""
    model, X = flagging_models[kind], bench_data.X
    _check(model, X)  # also the JIT warm-up
    calls = {"score": lambda: model.score(X), "explain": lambda: model.score_explain(X, TOP_K, True)}
    times: dict[str, list[float]] = {"score": [], "explain": []}

    def pair() -> None:
        order = ("score", "explain") if len(times["score"]) % 2 == 0 else ("explain", "score")
        for name in order:
            t0 = time.perf_counter()
            calls[name]()
            times[name].append(time.perf_counter() - t0)

    benchmark.group = f"explain-{kind}-interleaved-pairs"
    benchmark.pedantic(pair, rounds=2 * settings.fast_rounds, iterations=1)
    group, rows = f"explain-{kind}-1pct-flagged", X.shape[0]
    for name, role, what in (("explain", "ours", f"score_explain(top_k={TOP_K}, flagged_only=True), 1% flagged"),
                             ("score", "peer", "score (no explanations)")):
        median = float(np.median(times[name]))
        record_value(group=group, name=_name(settings, what), role=role, metric="throughput", value=rows / median,
                     rows=rows, seconds=float(np.sum(times[name])),
                     statistic=f"median of {len(times[name])} interleaved calls")


@KINDS
def test_explain_every_row(benchmark, record, settings, flagging_models, bench_data, kind):
    benchmark.group = f"explain-{kind}-1pct-flagged"
    model, X = flagging_models[kind], bench_data.X
    scores, features, _ = model.score_explain(X, TOP_K)
    np.testing.assert_array_equal(scores, model.score(X))
    assert np.all(features >= 0)
    benchmark.pedantic(model.score_explain, args=(X, TOP_K, False), rounds=settings.slow_rounds, iterations=1)
    record(benchmark, name=_name(settings, f"score_explain(top_k={TOP_K}), every row explained"), role="peer",
           metric="throughput", rows=X.shape[0])
