"""Kernel suites: records/s against batch size and threads, and per-call latency percentiles.

Same models and rows as ``benchmarks/conftest.py`` (same seed, sizes and fits), so the numbers can
be checked against the pytest-benchmark suites: an sklearn ``IsolationForest`` (100 trees,
max_samples=256) fitted on 100,000 standard-normal float32 rows x 32, exported with
``export_sklearn`` and loaded with ``load_model``; robust z and HBOS fitted with the training code.
Peers on the same rows: scikit-learn (``score_samples``: threading backend with N jobs for
batches >= 4,096, its sequential default below, which is its faster setting there), ONNX Runtime
(skl2onnx's graph, CPU provider, intra-op N threads) and float64 NumPy for robust z / HBOS.
Every implementation's scores are checked against the reference before it is timed.
"""

from __future__ import annotations

import tempfile
from functools import partial
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .common import MAX_SAMPLES, N_FEATURES, N_TREES, SEED, TRAIN_ROWS, Progress, latency_percentiles, time_call

IFOREST_ATOL = 1e-6
ONNX_ATOL = 1e-4
SKLEARN_THREADED_FROM = 4096   # batch size from which sklearn gets the threading backend
ONNX_MAX_BATCH = 262_144        # ONNX Runtime's graph takes ~9 s per 1M rows: larger batches only cost time

BATCHES_QUICK = [1, 64, 1024, 16_384, 262_144]
BATCHES_FULL = [1, 16, 256, 4096, 65_536, 262_144, 1_000_000]


@dataclass
class Peer:
    name: str
    fn: Any                 # X -> scores in outlierd's convention (higher = more anomalous)
    timed: Any              # X -> whatever is timed (the bare call)
    atol: float
    max_batch: int | None = None
    threads: Any = None     # t -> (X -> timed call) with t threads, for the thread sweep


@dataclass
class Detector:
    name: str
    ours: Any               # the loaded outlierd Model
    peers: list[Peer] = field(default_factory=list)


def _n_threads() -> int:
    import numba

    return int(numba.config.NUMBA_NUM_THREADS)  # type: ignore[attr-defined]  # the pool size, whatever set_num_threads says now


def robust_z_numpy(X: np.ndarray, median: np.ndarray, scale_inv: np.ndarray) -> np.ndarray:
    z = X - median
    z *= scale_inv
    z *= z
    s = z.sum(axis=1)
    s /= X.shape[1]
    return np.sqrt(s, out=s)


def hbos_numpy(X: np.ndarray, lo: np.ndarray, hi: np.ndarray, inv_width: np.ndarray, table: np.ndarray) -> np.ndarray:
    d = X.shape[1]
    n_bins = table.shape[1] - 2
    Xd = X.astype(np.float64)
    pos = (Xd - lo) * inv_width
    np.minimum(pos, n_bins - 1, out=pos)
    slot = pos.astype(np.intp) + 1
    slot[Xd < lo] = 0
    slot[Xd > hi] = n_bins + 1
    slot += np.arange(d, dtype=np.intp) * (n_bins + 2)
    return table.ravel().take(slot).sum(axis=1)


def _sklearn_peer(forest: Any, threads: int) -> Peer:
    from joblib import parallel_backend  # type: ignore[import-untyped]

    def call(X: np.ndarray, t: int = threads) -> np.ndarray:
        if X.shape[0] >= SKLEARN_THREADED_FROM:
            with parallel_backend("threading", n_jobs=t):
                return forest.score_samples(X)
        return forest.score_samples(X)

    return Peer(f"scikit-learn score_samples (threading n_jobs={threads} from {SKLEARN_THREADED_FROM:,} rows, else sequential)",
                fn=lambda X: -call(X), timed=call, atol=IFOREST_ATOL, threads=lambda t: (lambda X: call(X, t)))


def _onnx_peer(forest: Any, X1: np.ndarray, threads: int) -> Peer | None:
    try:
        import onnxruntime as ort
        import skl2onnx
    except ImportError:
        return None
    onx = skl2onnx.to_onnx(forest, X1, target_opset={"": 17, "ai.onnx.ml": 3})

    def session(t: int) -> Any:
        so = ort.SessionOptions()
        so.intra_op_num_threads = t
        so.inter_op_num_threads = 1
        return ort.InferenceSession(onx.SerializeToString(), so, providers=["CPUExecutionProvider"])

    sess = session(threads)
    name = sess.get_inputs()[0].name
    offset = float(forest.offset_)
    run = lambda X: sess.run(["scores"], {name: X})[0]  # noqa: E731
    # skl2onnx's "scores" is decision_function = score_samples - offset_
    return Peer(f"ONNX Runtime CPU, skl2onnx graph (intra_op={threads})", timed=run, atol=ONNX_ATOL, max_batch=ONNX_MAX_BATCH,
                fn=lambda X: -(run(X).reshape(-1).astype(np.float64) + offset))


@dataclass
class Models:
    X_train: np.ndarray
    X: np.ndarray
    forest: Any
    detectors: list[Detector]
    workdir: Path


def build(max_rows: int, progress: Progress, workdir: Path | None = None, onnx: bool = True) -> Models:
    """The models and rows every kernel suite uses (the same as benchmarks/conftest.py)."""
    from sklearn.ensemble import IsolationForest

    from outlierd.core import load_model
    from outlierd.core.preprocess import Preprocessing
    from outlierd.training.detectors import fit_hbos, fit_robust_z
    from outlierd.training.export import export_detector, export_sklearn

    workdir = workdir or Path(tempfile.mkdtemp(prefix="outlierd-bench-"))
    threads = _n_threads()
    with progress.step(f"generating {TRAIN_ROWS:,} training + {max_rows:,} scoring rows x {N_FEATURES}, fitting the models"):
        rng = np.random.default_rng(SEED)
        X_train = rng.standard_normal((TRAIN_ROWS, N_FEATURES), dtype=np.float32)
        X = rng.standard_normal((max_rows, N_FEATURES), dtype=np.float32)
        names = [f"x{j}" for j in range(N_FEATURES)]
        forest = IsolationForest(n_estimators=N_TREES, max_samples=MAX_SAMPLES, random_state=SEED).fit(X_train)
        iforest = load_model(export_sklearn(forest, workdir / "iforest", names, X_train=X_train))
        prep = Preprocessing.identity(N_FEATURES, median=np.median(X_train, axis=0))
        Xd = X_train.astype(np.float64)
        _, rz = fit_robust_z(Xd)
        robust_z = load_model(export_detector(workdir / "robust_z", detector={"kind": "robust_z", "params": {"combine": "rms"}},
                                              arrays=rz, prep=prep, feature_names=names, threshold=1.0, X_train=X_train))
        _, hb = fit_hbos(Xd, n_bins=50, alpha=1.0)
        hbos = load_model(export_detector(workdir / "hbos", detector={"kind": "hbos", "params": {"n_bins": 50, "alpha": 1.0}},
                                          arrays=hb, prep=prep, feature_names=names, threshold=20.0, X_train=X_train))
    peers = [_sklearn_peer(forest, threads)]
    if onnx:
        with progress.step("converting the forest for ONNX Runtime (skl2onnx)"):
            p = _onnx_peer(forest, X[:1], threads)
        if p is not None:
            peers.append(p)
    np_name = "NumPy float64 vectorised (1 thread)"
    rz_fn = lambda X: robust_z_numpy(X, rz["rz_median"], rz["rz_scale_inv"])  # noqa: E731
    hb_fn = lambda X: hbos_numpy(X, hb["hb_lo"], hb["hb_hi"], hb["hb_inv_width"], hb["hb_table"])  # noqa: E731
    detectors = [
        Detector("iforest", iforest, peers),
        Detector("robust_z", robust_z, [Peer(np_name, fn=rz_fn, timed=rz_fn, atol=1e-9)]),
        Detector("hbos", hbos, [Peer(np_name, fn=hb_fn, timed=hb_fn, atol=1e-9)]),
    ]
    return Models(X_train, X, forest, detectors, workdir)


def _check(det: Detector, X: np.ndarray) -> None:
    """Every peer gives the same scores as ours on these rows, before anything is timed."""
    ours = det.ours.score(X)
    for p in det.peers:
        diff = float(np.max(np.abs(p.fn(X) - ours))) if X.shape[0] else 0.0
        if not diff <= p.atol:
            raise AssertionError(f"{det.name}: {p.name} differs from outlierd by {diff:.3g} (> {p.atol:g})")


def throughput(models: Models, batches: list[int], budget_s: float, progress: Progress) -> dict[str, Any]:
    """records/s of each detector and peer at each batch size (default threads: all)."""
    out: dict[str, Any] = {"batches": batches, "threads": _n_threads(), "detectors": {}}
    for det in models.detectors:
        _check(det, models.X[:4096])
        rows: list[dict[str, Any]] = []
        for b in batches:
            X = models.X[:b]
            progress.say(f"kernels: {det.name}, batch {b:,}")
            t = time_call(partial(det.ours.score, X), budget_s=budget_s)
            row: dict[str, Any] = {"batch": b, "ours": t.records_per_s(b), "ours_median_s": t.median_s, "ours_min_s": t.min_s,
                                   "rounds": t.rounds, "peers": {}}
            for p in det.peers:
                if p.max_batch is not None and b > p.max_batch:
                    continue
                tp = time_call(partial(p.timed, X), budget_s=budget_s)
                row["peers"][p.name] = {"records_per_s": tp.records_per_s(b), "median_s": tp.median_s, "min_s": tp.min_s,
                                        "rounds": tp.rounds, "ratio": t.records_per_s(b) / tp.records_per_s(b)}
            rows.append(row)
        out["detectors"][det.name] = {"ours": f"outlierd Model.score (Numba, {_n_threads()} threads)",
                                      "peers": [p.name for p in det.peers], "points": rows}
    return out


def threads_sweep(models: Models, rows: int, budget_s: float, progress: Progress) -> dict[str, Any]:
    """Isolation Forest records/s at ``rows`` rows with 1..N threads, ours and scikit-learn."""
    import numba

    n = _n_threads()
    det = models.detectors[0]
    sk = det.peers[0]
    X = models.X[:rows]
    points = []
    try:
        for t in range(1, n + 1):
            progress.say(f"kernels: iforest, {rows:,} rows, {t} thread(s)")
            numba.set_num_threads(t)
            to = time_call(partial(det.ours.score, X, parallel=True), budget_s=budget_s)
            call = sk.threads(t)
            ts = time_call(partial(call, X), budget_s=budget_s)
            points.append({"threads": t, "ours": to.records_per_s(rows), "sklearn": ts.records_per_s(rows),
                           "ratio": to.records_per_s(rows) / ts.records_per_s(rows)})
    finally:
        numba.set_num_threads(n)
    # the complete-tree layout walks every tree to the forest's depth: node visits per record = trees x depth
    depth = max(int(e.tree_.max_depth) for e in models.forest.estimators_)
    visits = len(models.forest.estimators_) * depth
    for p in points:
        p["ns_per_node_visit"] = 1e9 / (p["ours"] * visits) * p["threads"]  # per thread
    return {"rows": rows, "detector": "iforest", "peer": sk.name, "node_visits_per_record": visits, "points": points}


def latency(models: Models, sizes: tuple[int, ...], calls: int, budget_s: float, progress: Progress) -> dict[str, Any]:
    """p50 / p99 / p99.9 of single calls of 1 and 64 records, ours and each peer, per detector."""
    out: dict[str, Any] = {}
    for det in models.detectors:
        per: dict[str, Any] = {}
        for k in sizes:
            X = models.X[:k]
            _check(det, X)
            progress.say(f"latency: {det.name}, {k} record(s) per call")
            peers = {p.name: latency_percentiles(partial(p.timed, X), calls=calls, budget_s=budget_s) for p in det.peers}
            per[str(k)] = {"ours": latency_percentiles(partial(det.ours.score, X), calls=calls, budget_s=budget_s), "peers": peers}
        out[det.name] = per
    return out
