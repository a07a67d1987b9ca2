"""Prediction capture's cost: ``outlierd serve`` streaming throughput with capture on vs off.

Two servers of the same model run side by side for the whole module, differing only in capture:
``--capture-sample 0.01 --feedback-store <tmp>/fb.sqlite`` (the default: every flagged record and 1% of
the others go to the SQLite store through the capture writer) and ``--no-capture``. The harness is
test_bench_server.py's: the model (an Isolation Forest trained by ``training.train.train`` on 20,000 x
32 standard-normal rows, alert rate 0.01), the load rows, ``benchmarks/loadgen.py`` in its own process,
``ROUNDS`` rounds of warm-up + measured window per scenario, off then on, then on then off, and so
on (so a drift of the machine's load over the run favours neither), medians. The table's ratio is
on / off (records/s) of the medians: 1.0 means capture is free; the target is >= 0.90. The line
printed per scenario also gives the median of the rounds' own on/off ratios (each pair ran back to
back) and every pair's ratio: the spread between rounds is the machine's noise.

Before timing, both servers' scores are checked against ``core.load_model(...).score``. After the
rounds, the capture server's ``/metrics`` says how many records it captured and dropped (a writer that
falls behind drops rather than slowing scoring, so both numbers belong next to the throughput).

Knobs: those of test_bench_server.py (OUTLIERD_BENCH_SERVER_ROUNDS, _SECONDS, _WARMUP, _ARGS).
"""

from __future__ import annotations

import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from test_bench_server import (ATOL, MODEL, ROUNDS, SECONDS, SERVER_ARGS, SMOKE_SECONDS, WARMUP, Scenario, ServerProcess, _median,
                               _summary, free_port, run_loadgen, served_model)

TARGET_CAPTURE_RATIO = 0.90  # throughput with capture >= 90% of without
SCENARIOS = [
    Scenario("stream-256x1", "stream", 256),
    Scenario("stream-256x4", "stream", 256, streams=4),
    Scenario("stream-4096-raw", "stream", 4096),
]


@dataclass(frozen=True)
class CaptureBench:
    data: Path
    on: ServerProcess
    off: ServerProcess
    metrics_port: int


def _scrape(port: int) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name in ("outlierd_captured_total", "outlierd_capture_dropped_total", "outlierd_records_scored_total"):
                out[s.name] = out.get(s.name, 0.0) + s.value
    return out


@pytest.fixture(scope="module")
def capture_bench(tmp_path_factory: pytest.TempPathFactory, bench_step) -> CaptureBench:
    from outlierd.server.client import ScorerClient

    tmp = tmp_path_factory.mktemp("capture")
    registry, model, X, data = served_model(tmp, bench_step)
    base = [sys.executable, "-m", "outlierd", "serve", "--registry", str(registry), "--model", MODEL, "--host", "127.0.0.1"]
    p_on, p_off, p_metrics = free_port(), free_port(), free_port()
    on = ServerProcess("outlierd-capture", base + ["--port", str(p_on), "--metrics-port", str(p_metrics), "--capture-sample", "0.01",
                                                   "--feedback-store", str(tmp / "fb.sqlite"), *SERVER_ARGS], p_on, tmp)
    off = ServerProcess("outlierd-no-capture", base + ["--port", str(p_off), "--metrics-port", "0", "--no-capture", *SERVER_ARGS], p_off, tmp)
    with bench_step("starting `outlierd serve` with capture on and with --no-capture, waiting for SERVING"):
        on.start()
        try:
            off.start()
        except BaseException:
            on.stop()
            raise
    try:
        with bench_step("checking both servers' scores against core.load_model(...).score"):
            for server in (on, off):
                with ScorerClient(server.target) as c:
                    batch = X[:4096]
                    got = list(c.score_stream([batch[k:k + 256] for k in range(0, 4096, 256)], raw=True))
                    np.testing.assert_allclose(np.concatenate([r.scores for r in got]), model.score(batch), rtol=0, atol=ATOL)
        yield CaptureBench(data, on, off, p_metrics)
    finally:
        alive = {s.name: s.alive() for s in (on, off)}
        for s in (on, off):
            s.stop()
        assert all(alive.values()), f"a server died during the benchmarks: {alive}\n{on.log_tail()}\n{off.log_tail()}"


@pytest.mark.parametrize("sc", SCENARIOS, ids=[f"capture-{sc.key}" for sc in SCENARIOS])
def test_capture_overhead(benchmark, record_value, capture_bench: CaptureBench, sc: Scenario):
    """Streaming records/s with capture on vs off, alternating rounds on the same machine."""
    enabled = benchmark.enabled
    rounds, warmup, seconds = (ROUNDS, WARMUP, SECONDS) if enabled else (1, SMOKE_SECONDS, SMOKE_SECONDS)
    benchmark.group = f"capture-{sc.key}"

    def run() -> dict[str, list[dict]]:
        out: dict[str, list[dict]] = {"off": [], "on": []}
        order = (("off", capture_bench.off), ("on", capture_bench.on))
        for k in range(rounds):
            # off-on, then on-off: a drift of the machine's load over the run does not favour either
            for role, server in (order if k % 2 == 0 else order[::-1]):
                out[role].append(run_loadgen(server, capture_bench.data, sc, warmup, seconds))
                assert server.alive(), f"{server.name} died under load:\n{server.log_tail()}"
        return out

    before = _scrape(capture_bench.metrics_port)
    runs = benchmark.pedantic(run, rounds=1, iterations=1)
    after = _scrape(capture_bench.metrics_port)
    counts = {k.removeprefix("outlierd_"): after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    ratio = _median(runs["on"], "records_per_s") / _median(runs["off"], "records_per_s")
    # each round's on/off pair ran back to back: their ratio is less exposed to the load of others
    paired = sorted(a["records_per_s"] / b["records_per_s"] for a, b in zip(runs["on"], runs["off"]))
    paired_median = float(np.median(paired))
    benchmark.extra_info.update({"scenario": sc.key, "rounds": rounds, "seconds_per_round": seconds, "server_args": SERVER_ARGS,
                                 "on_runs": _summary(runs["on"]), "off_runs": _summary(runs["off"]), "capture_counts": counts,
                                 "ratio_on_off": ratio, "paired_ratios": paired, "paired_ratio_median": paired_median,
                                 "target_ratio": TARGET_CAPTURE_RATIO})
    print(f"\ncapture {sc.key}: on/off = {ratio:.3f} (medians), {paired_median:.3f} (median of the rounds' pairs: "
          f"{', '.join(f'{r:.2f}' for r in paired)}) (target >= {TARGET_CAPTURE_RATIO:g}); "
          f"captured {counts.get('captured_total', 0):,.0f} and dropped {counts.get('capture_dropped_total', 0):,.0f} "
          f"of {counts.get('records_scored_total', 0):,.0f} records scored")
    if not enabled:
        return
    for role, name in (("on", "outlierd serve (capture on, sample 0.01)"), ("off", "outlierd serve --no-capture")):
        rs = runs[role]
        record_value(group=f"capture-{sc.key}", metric="throughput", value=_median(rs, "records_per_s"),
                     statistic=f"median of {len(rs)} rounds of records/s over {seconds:g} s", name=name,
                     role="ours" if role == "on" else "peer", rows=sc.records, seconds=sum(r["seconds"] for r in rs),
                     extra={"runs": _summary(rs), **({"capture_counts": counts} if role == "on" else {})})
