"""Shared fixtures and the ratio report for outlierd's benchmarks (pytest-benchmark).

Run (outside the normal test run; ``testpaths`` is ``tests/`` only)::

    PYTHONPATH=. .venv/bin/python -m pytest benchmarks --benchmark-only -p no:cacheprovider

``OUTLIERD_BENCH_ROWS`` overrides the number of scored rows (default 1,000,000).

Every model and data set is a session-scoped fixture, built once. Each benchmark checks that the
callable it times produces the same scores as its peer, times it, and stores its median in the
session's results collector; ``pytest_terminal_summary`` prints one table with, per group, our
number, each peer's number and the ratio, and writes it to ``.benchmarks/summary.json``.

``test_bench_server.py`` (the gRPC server against a bare grpc.aio echo server) measures in other
processes and stores its numbers with ``record_value``; its groups (``server-*``) get their own table
(ours, floor, ratio = ours / floor) and targets. ``OUTLIERD_BENCH_ROWS`` does not apply to it.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pytest

from outlierd.bench.common import machine

# --------------------------------------------------------------------------------------------
# Sizes (the same model and data for every peer)
# --------------------------------------------------------------------------------------------

DEFAULT_ROWS = 1_000_000
ROWS = int(os.environ.get("OUTLIERD_BENCH_ROWS", DEFAULT_ROWS))
N_FEATURES = 32
N_TREES = 100
MAX_SAMPLES = 256
TRAIN_ROWS = 100_000      # training set, independent of ROWS so the model is the same at any size
HBOS_BINS = 50
SEED = 20240601
N_THREADS = 2             # threads given to every multi-threaded peer (sklearn, ONNX Runtime)

# Slow peers (about a second or more per call at 1M rows) use pedantic rounds of one call.
SLOW_ROUNDS = 3
FAST_ROUNDS = 7

TARGET_SKLEARN_SPEEDUP = 5.0   # outlierd throughput >= 5x scikit-learn's
TARGET_LATENCY_1ROW_US = 15.0  # outlierd median latency of a 1-row call <= 15 us

IFOREST_ATOL = 1e-6   # ours vs -score_samples (float64 leaf values, bit-exact float32 splits)
ONNX_ATOL = 1e-4      # ONNX Runtime computes in float32

GROUP_TITLES = {
    "iforest-throughput": f"Isolation Forest throughput, {ROWS:,} rows",
    "iforest-latency-1row": "Isolation Forest latency, 1 row per call",
    "iforest-latency-64rows": "Isolation Forest latency, 64 rows per call",
    "robust_z-throughput": f"robust z throughput, {ROWS:,} rows",
    "hbos-throughput": f"HBOS throughput, {ROWS:,} rows",
}

# gRPC server benchmarks (test_bench_server.py): `outlierd serve` against a bare grpc.aio echo server
# (the transport floor), same run, same load generator. Groups start with SERVER_GROUP_PREFIX and get
# their own table: ours, floor, ratio = ours / floor (records/s, or microseconds for latencies).
SERVER_GROUP_PREFIX = "server-"
TARGET_SERVER_STREAM_FRACTION = 0.60   # streaming records/s >= 60% of the floor's
TARGET_SERVER_UNARY_P99_FACTOR = 2.0   # unary p99 latency <= 2x the floor's
SERVER_GROUP_TITLES = {
    "server-stream-256x1": "stream, 256-record messages (raw_values), 1 stream",
    "server-stream-256x4": "stream, 256-record messages (raw_values), 4 streams",
    "server-unary-1row-c1-p50": "unary, 1 record (raw_values), concurrency 1, p50",
    "server-unary-1row-c1-p99": "unary, 1 record (raw_values), concurrency 1, p99",
    "server-unary-1row-c16-p50": "unary, 1 record (raw_values), concurrency 16, p50",
    "server-unary-1row-c16-p99": "unary, 1 record (raw_values), concurrency 16, p99",
    "server-stream-4096-values": "stream, 4,096-record messages (values), 1 stream",
    "server-stream-4096-raw": "stream, 4,096-record messages (raw_values), 1 stream",
}
GROUP_TITLES.update(SERVER_GROUP_TITLES)




@dataclass(frozen=True)
class Settings:
    """The constants above, for the test modules (as a fixture: ``from conftest import`` is fragile
    when several conftest.py files are collected in one run)."""

    rows: int = ROWS
    n_threads: int = N_THREADS
    slow_rounds: int = SLOW_ROUNDS
    fast_rounds: int = FAST_ROUNDS
    iforest_atol: float = IFOREST_ATOL
    onnx_atol: float = ONNX_ATOL

    @property
    def numba_threads(self) -> int:
        import numba

        return numba.get_num_threads()


@pytest.fixture(scope="session")
def settings() -> Settings:
    return Settings()


# --------------------------------------------------------------------------------------------
# Results collector and the summary table
# --------------------------------------------------------------------------------------------


@dataclass
class Result:
    group: str
    name: str
    role: str              # "ours" or "peer"
    metric: str            # "throughput" (records/s) or "latency" (us per call)
    value: float           # records/s or median us per call
    rows: int              # rows per call
    median_s: float
    min_s: float
    mean_s: float
    rounds: int
    statistic: str = "median"   # what `value` is: "median" of rounds, or e.g. "p99" / "mean over 5 s"
    extra: dict[str, Any] = field(default_factory=dict)


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


@dataclass
class Collector:
    results: list[Result] = field(default_factory=list)
    loadavg_at_start: list[float] | None = field(default_factory=_loadavg)

    def add(self, benchmark: Any, *, name: str, role: str, metric: str, rows: int) -> Result | None:
        """Store ``benchmark``'s median (none when benchmarks are disabled: nothing was timed)."""
        meta = getattr(benchmark, "stats", None)
        stats = getattr(meta, "stats", None)
        if stats is None or not getattr(stats, "data", None):
            return None
        median = float(stats.median)
        value = rows / median if metric == "throughput" else median * 1e6
        res = Result(group=benchmark.group or "ungrouped", name=name, role=role, metric=metric, value=value,
                     rows=rows, median_s=median, min_s=float(stats.min), mean_s=float(stats.mean),
                     rounds=int(stats.rounds))
        self.results.append(res)
        benchmark.extra_info.update({"implementation": name, "role": role, "rows_per_call": rows,
                                     ("records_per_s" if metric == "throughput" else "median_us"): value})
        return res

    def add_value(self, *, group: str, name: str, role: str, metric: str, value: float, rows: int,
                  seconds: float, statistic: str, extra: dict[str, Any] | None = None) -> Result:
        """Store a number measured outside pytest-benchmark's timer (e.g. by a load generator in
        another process): records/s for "throughput", microseconds per call for "latency".
        ``seconds`` is the measured window; it is stored as the (single) round."""
        per_call = rows / value if metric == "throughput" and value > 0 else value / 1e6
        res = Result(group=group, name=name, role=role, metric=metric, value=value, rows=rows,
                     median_s=per_call, min_s=per_call, mean_s=per_call, rounds=1, statistic=statistic,
                     extra={"window_s": seconds, **(extra or {})})
        self.results.append(res)
        return res

    def table(self) -> list[dict[str, Any]]:
        """Per group: ours, then each peer with ratio = how many times faster ours is
        (ours / peer for throughput, peer / ours for latency)."""
        groups: dict[str, list[Result]] = {}
        for r in self.results:
            groups.setdefault(r.group, []).append(r)
        order = list(GROUP_TITLES) + sorted(g for g in groups if g not in GROUP_TITLES)
        out = []
        for g in order:
            if g not in groups:
                continue
            rs = groups[g]
            ours = next((r for r in rs if r.role == "ours"), None)
            peers = []
            for p in (r for r in rs if r.role == "peer"):
                ratio = None
                if ours is not None and p.value > 0 and ours.value > 0:
                    ratio = ours.value / p.value if p.metric == "throughput" else p.value / ours.value
                peers.append({**asdict(p), "ratio": ratio})
            out.append({"group": g, "title": GROUP_TITLES.get(g, g), "metric": rs[0].metric,
                        "unit": "records/s" if rs[0].metric == "throughput" else "us per call (median)",
                        "ours": asdict(ours) if ours else None, "peers": peers})
        return out


_COLLECTOR = pytest.StashKey[Collector]()


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_COLLECTOR] = Collector()


@pytest.fixture(scope="session")
def bench_results(pytestconfig: pytest.Config) -> Collector:
    return pytestconfig.stash[_COLLECTOR]


@pytest.fixture
def record(bench_results: Collector) -> Callable[..., Result | None]:
    """``record(benchmark, name=..., role="ours"|"peer", metric="throughput"|"latency", rows=n)``."""
    return bench_results.add


@pytest.fixture
def record_value(bench_results: Collector) -> Callable[..., Result]:
    """``record_value(group=..., name=..., role=..., metric=..., value=..., rows=..., seconds=...,
    statistic=...)``: a number measured outside pytest-benchmark's timer."""
    return bench_results.add_value


def server_table(table: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The server groups as rows: scenario, ours, floor, ratio = ours / floor, and the target."""
    rows = []
    for g in table:
        if not g["group"].startswith(SERVER_GROUP_PREFIX):
            continue
        ours, floor = g["ours"], next(iter(g["peers"]), None)
        ratio = ours["value"] / floor["value"] if ours and floor and floor["value"] > 0 else None
        target, met = None, None
        if g["metric"] == "throughput":
            target = f"ours/floor >= {TARGET_SERVER_STREAM_FRACTION:g}"
            met = None if ratio is None else ratio >= TARGET_SERVER_STREAM_FRACTION
        elif g["group"].endswith("-p99"):
            target = f"ours/floor <= {TARGET_SERVER_UNARY_P99_FACTOR:g}"
            met = None if ratio is None else ratio <= TARGET_SERVER_UNARY_P99_FACTOR
        if floor is not None:
            floor = {k: v for k, v in floor.items() if k != "ratio"}  # the generic, peer-style ratio
        rows.append({"group": g["group"], "title": g["title"], "metric": g["metric"], "unit": g["unit"],
                     "ours": ours, "floor": floor, "ratio": ratio,
                     "ratio_definition": "ours / floor (records/s: higher is better; latency: lower is better)",
                     "target": target, "met": met})
    return rows


def _fmt_value(metric: str, v: float) -> str:
    if metric == "throughput":
        return f"{v / 1e6:,.3f} M rec/s" if v >= 1e5 else f"{v:,.0f} rec/s"
    return f"{v:,.1f} us" if v < 1e4 else f"{v / 1e3:,.2f} ms"


def _targets(table: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by_group = {t["group"]: t for t in table}
    out = []
    tp = by_group.get("iforest-throughput")
    sk = next((p for p in (tp or {}).get("peers", []) if p["name"].startswith("scikit-learn")), None)
    out.append({"target": f"iforest throughput >= {TARGET_SKLEARN_SPEEDUP:g}x scikit-learn",
                "measured": sk["ratio"] if sk else None, "unit": "x",
                "met": (sk["ratio"] >= TARGET_SKLEARN_SPEEDUP) if sk and sk["ratio"] is not None else None})
    lat = (by_group.get("iforest-latency-1row") or {}).get("ours")
    out.append({"target": f"iforest 1-row call <= {TARGET_LATENCY_1ROW_US:g} us (median)",
                "measured": lat["value"] if lat else None, "unit": "us",
                "met": (lat["value"] <= TARGET_LATENCY_1ROW_US) if lat else None})
    return out


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    collector = config.stash.get(_COLLECTOR, None)
    if collector is None or not collector.results:
        return
    table = collector.table()
    targets = _targets(table)
    tr = terminalreporter
    tr.write_sep("=", "outlierd benchmark summary (median of rounds; ratio = times faster than the peer)")
    tr.write_line(f"data: {ROWS:,} x {N_FEATURES} float32 rows; iforest: sklearn IsolationForest, {N_TREES} trees, "
                  f"max_samples={MAX_SAMPLES}; load average at start {collector.loadavg_at_start}, now {_loadavg()}")
    w_name = max([len(r.name) for r in collector.results if not r.group.startswith(SERVER_GROUP_PREFIX)] + [14])
    for g in table:
        if g["group"].startswith(SERVER_GROUP_PREFIX):
            continue
        tr.write_line("")
        tr.write_line(f"{g['title']}  [{g['unit']}]", bold=True)
        ours = g["ours"]
        if ours:
            tr.write_line(f"  {'ours: ' + ours['name']:<{w_name + 6}}  {_fmt_value(ours['metric'], ours['value']):>16}")
        for p in g["peers"]:
            ratio = "n/a (ours not run)" if p["ratio"] is None else f"{p['ratio']:,.2f}x faster"
            how = "(ours / peer)" if p["metric"] == "throughput" else "(peer / ours)"
            tr.write_line(f"  {'peer: ' + p['name']:<{w_name + 6}}  {_fmt_value(p['metric'], p['value']):>16}   "
                          f"ours is {ratio} {how if p['ratio'] is not None else ''}".rstrip())
    servers = server_table(table)
    if servers:
        _write_server_table(tr, servers)
        targets += [{"target": f"server {r['title']}: {r['target']}", "measured": r["ratio"], "unit": "x", "met": r["met"]}
                    for r in servers if r["target"] is not None]
    tr.write_line("")
    tr.write_line("targets:", bold=True)
    for t in targets:
        if t["measured"] is None:
            tr.write_line(f"  {t['target']}: not measured in this run")
        else:
            tr.write_line(f"  {t['target']}: {t['measured']:,.2f} {t['unit']} -> {'MET' if t['met'] else 'NOT MET'}",
                          green=bool(t["met"]), red=not t["met"])
    summary = {
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "rows": ROWS, "n_features": N_FEATURES, "n_trees": N_TREES, "max_samples": MAX_SAMPLES,
        "train_rows": TRAIN_ROWS, "hbos_bins": HBOS_BINS, "peer_threads": N_THREADS,
        "statistic": "median", "ratio": "times faster than the peer: ours/peer for throughput, peer/ours for latency",
        "machine": machine(), "groups": table, "targets": targets, "server": servers,
        # 1/5/15-minute load averages: other work on a small shared machine shows up here and in the timings
        "loadavg_at_start": collector.loadavg_at_start, "loadavg_at_end": _loadavg(),
    }
    path = config.rootpath / ".benchmarks" / "summary.json"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        tr.write_line(f"\nwritten: {path}")
    except OSError as e:
        tr.write_line(f"\ncould not write {path}: {e}", red=True)


def _write_server_table(tr: Any, rows: list[dict[str, Any]]) -> None:
    first = next((r["ours"] or r["floor"] for r in rows if r["ours"] or r["floor"]), None) or {}
    ours_name = next((r["ours"]["name"] for r in rows if r["ours"]), "-")
    floor_name = next((r["floor"]["name"] for r in rows if r["floor"]), "-")
    tr.write_line("")
    tr.write_line("outlierd gRPC server vs the transport floor, same run, 127.0.0.1  [ratio = ours / floor]", bold=True)
    tr.write_line(f"  ours:  {ours_name}")
    tr.write_line(f"  floor: {floor_name}")
    extra = first.get("extra", {})
    if extra:
        tr.write_line(f"  load: {extra.get('loadgen', '')}")
    w = max(len(r["title"]) for r in rows)
    tr.write_line(f"  {'scenario':<{w}}  {'ours':>14}  {'floor':>14}  {'ratio':>7}  target")
    for r in rows:
        o = _fmt_value(r["metric"], r["ours"]["value"]) if r["ours"] else "-"
        f = _fmt_value(r["metric"], r["floor"]["value"]) if r["floor"] else "-"
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}"
        verdict = "" if r["target"] is None else f"{r['target']}: " + ("n/a" if r["met"] is None else "MET" if r["met"] else "NOT MET")
        tr.write_line(f"  {r['title']:<{w}}  {o:>14}  {f:>14}  {ratio:>7}  {verdict}".rstrip(),
                      green=r["met"] is True, red=r["met"] is False)


# --------------------------------------------------------------------------------------------
# Progress lines (session fixtures take seconds at full size; pytest captures print())
# --------------------------------------------------------------------------------------------


class _Step:
    def __init__(self, config: pytest.Config, what: str):
        self.tr = config.pluginmanager.get_plugin("terminalreporter")
        self.capture = config.pluginmanager.get_plugin("capturemanager")
        self.what = what

    def _say(self, msg: str) -> None:
        if self.tr is None:
            return
        if self.capture is not None:
            with self.capture.global_and_fixture_disabled():  # fd-level capture would swallow the line
                self.tr.write_line(f"[bench] {msg}")
        else:
            self.tr.write_line(f"[bench] {msg}")

    def __enter__(self) -> _Step:
        self.t0 = time.perf_counter()
        self._say(f"{self.what} ...")
        return self

    def __exit__(self, *exc: Any) -> None:
        if exc[0] is None:
            self._say(f"{self.what}: done in {time.perf_counter() - self.t0:.1f} s")


@pytest.fixture(scope="session")
def bench_step(pytestconfig: pytest.Config) -> Callable[[str], _Step]:
    """``with bench_step("doing x"):`` prints ``[bench] doing x ...`` and its duration."""
    return lambda what: _Step(pytestconfig, what)


# --------------------------------------------------------------------------------------------
# Data and models (session-scoped: built once)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchData:
    X_train: np.ndarray   # (TRAIN_ROWS, N_FEATURES) float32, what every model is fitted on
    X: np.ndarray         # (ROWS, N_FEATURES) float32, C-contiguous: what every benchmark scores


@pytest.fixture(scope="session")
def bench_data(pytestconfig: pytest.Config) -> BenchData:
    with _Step(pytestconfig, f"generating {TRAIN_ROWS:,} training + {ROWS:,} scoring rows x {N_FEATURES} float32"):
        rng = np.random.default_rng(SEED)
        X_train = rng.standard_normal((TRAIN_ROWS, N_FEATURES), dtype=np.float32)
        X = rng.standard_normal((ROWS, N_FEATURES), dtype=np.float32)
    return BenchData(X_train, X)


@pytest.fixture(scope="session")
def feature_names() -> list[str]:
    return [f"x{j}" for j in range(N_FEATURES)]


@pytest.fixture(scope="session")
def sk_forest(pytestconfig: pytest.Config, bench_data: BenchData) -> Any:
    from sklearn.ensemble import IsolationForest

    with _Step(pytestconfig, f"fitting sklearn IsolationForest ({N_TREES} trees, max_samples={MAX_SAMPLES})"):
        return IsolationForest(n_estimators=N_TREES, max_samples=MAX_SAMPLES, random_state=SEED).fit(bench_data.X_train)


@pytest.fixture(scope="session")
def sk_reference(pytestconfig: pytest.Config, sk_forest: Any, bench_data: BenchData) -> np.ndarray:
    """``-forest.score_samples(X)`` (float64): the scores every Isolation Forest peer must match."""
    from joblib import parallel_backend

    with _Step(pytestconfig, f"scikit-learn reference scores for {ROWS:,} rows"):
        with parallel_backend("threading", n_jobs=N_THREADS):
            return -sk_forest.score_samples(bench_data.X)


@pytest.fixture(scope="session")
def iforest_model(pytestconfig: pytest.Config, tmp_path_factory: pytest.TempPathFactory, sk_forest: Any,
                  bench_data: BenchData, feature_names: list[str]) -> Any:
    """Our artifact of the same forest, exported and loaded (probe-verified)."""
    from outlierd.core import load_model
    from outlierd.training.export import export_sklearn

    with _Step(pytestconfig, "exporting + loading the outlierd iforest artifact"):
        path = export_sklearn(sk_forest, tmp_path_factory.mktemp("iforest") / "model", feature_names,
                              X_train=bench_data.X_train)
        return load_model(path)


@dataclass(frozen=True)
class OnnxForest:
    session: Any
    input_name: str
    offset: float   # forest.offset_: ONNX "scores" = decision_function = score_samples - offset_

    def run(self, X: np.ndarray) -> np.ndarray:
        """The raw ``scores`` output, (n, 1) float32: what the benchmarks time."""
        return self.session.run(["scores"], {self.input_name: X})[0]

    def to_outlierd(self, raw: np.ndarray) -> np.ndarray:
        """ONNX ``scores`` -> outlierd's convention: ``-(scores + offset_) == -score_samples``."""
        return -(raw.reshape(-1).astype(np.float64) + self.offset)


@pytest.fixture(scope="session")
def onnx_forest(pytestconfig: pytest.Config, sk_forest: Any, bench_data: BenchData) -> OnnxForest:
    ort = pytest.importorskip("onnxruntime")
    skl2onnx = pytest.importorskip("skl2onnx")
    with _Step(pytestconfig, "converting the forest with skl2onnx + creating the ONNX Runtime session"):
        # skl2onnx 1.20 emits ai.onnx.ml v3 ops for IsolationForest and refuses a higher ml opset.
        onx = skl2onnx.to_onnx(sk_forest, bench_data.X[:1], target_opset={"": 17, "ai.onnx.ml": 3})
        so = ort.SessionOptions()
        so.intra_op_num_threads = N_THREADS
        so.inter_op_num_threads = 1
        sess = ort.InferenceSession(onx.SerializeToString(), so, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    assert "scores" in names, f"skl2onnx IsolationForest outputs are {names}; expected label + scores"
    return OnnxForest(sess, sess.get_inputs()[0].name, float(sk_forest.offset_))


# robust z and HBOS: fitted here with plain NumPy so the benchmarks depend only on core + export.


@dataclass(frozen=True)
class RobustZParams:
    median: np.ndarray
    scale_inv: np.ndarray


@dataclass(frozen=True)
class HbosParams:
    lo: np.ndarray
    hi: np.ndarray
    inv_width: np.ndarray
    table: np.ndarray


@pytest.fixture(scope="session")
def robust_z_params(bench_data: BenchData) -> RobustZParams:
    from outlierd.training.detectors import fit_robust_z  # the same fit `outlierd train` uses

    _, a = fit_robust_z(bench_data.X_train.astype(np.float64))
    return RobustZParams(a["rz_median"], a["rz_scale_inv"])


@pytest.fixture(scope="session")
def hbos_params(bench_data: BenchData) -> HbosParams:
    from outlierd.training.detectors import fit_hbos

    _, a = fit_hbos(bench_data.X_train.astype(np.float64), n_bins=HBOS_BINS, alpha=1.0)
    return HbosParams(a["hb_lo"], a["hb_hi"], a["hb_inv_width"], a["hb_table"])


def _export_and_load(tmp_path_factory: pytest.TempPathFactory, kind: str, detector: dict, arrays: dict,
                     bench_data: BenchData, feature_names: list[str], threshold: float) -> Any:
    from outlierd.core import load_model
    from outlierd.core.preprocess import Preprocessing
    from outlierd.training.export import export_detector

    prep = Preprocessing.identity(N_FEATURES, median=np.median(bench_data.X_train, axis=0))
    path = export_detector(tmp_path_factory.mktemp(kind) / "model", detector=detector, arrays=arrays, prep=prep,
                           feature_names=feature_names, threshold=threshold, X_train=bench_data.X_train)
    return load_model(path)


@pytest.fixture(scope="session")
def robust_z_model(pytestconfig: pytest.Config, tmp_path_factory: pytest.TempPathFactory, bench_data: BenchData,
                   feature_names: list[str], robust_z_params: RobustZParams) -> Any:
    with _Step(pytestconfig, "exporting + loading the robust_z artifact"):
        return _export_and_load(tmp_path_factory, "robust_z", {"kind": "robust_z", "params": {"combine": "rms"}},
                                {"rz_median": robust_z_params.median, "rz_scale_inv": robust_z_params.scale_inv},
                                bench_data, feature_names, threshold=1.0)


@pytest.fixture(scope="session")
def hbos_model(pytestconfig: pytest.Config, tmp_path_factory: pytest.TempPathFactory, bench_data: BenchData,
               feature_names: list[str], hbos_params: HbosParams) -> Any:
    p = hbos_params
    with _Step(pytestconfig, "exporting + loading the hbos artifact"):
        return _export_and_load(tmp_path_factory, "hbos", {"kind": "hbos", "params": {"n_bins": HBOS_BINS, "alpha": 1.0}},
                                {"hb_lo": p.lo, "hb_hi": p.hi, "hb_inv_width": p.inv_width, "hb_table": p.table},
                                bench_data, feature_names, threshold=20.0)  # threshold is irrelevant to scoring speed
