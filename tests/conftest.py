import contextlib
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]

pytest_plugins = ("pgtest",)  # PostgreSQL fixtures: pg_url, pg_cluster

DATASETS = (ROOT.parent / "shared" / "datasets")
if not DATASETS.is_dir():
    DATASETS = Path(os.environ.get("OUTLIERD_DATASETS", ROOT / "data"))


def dataset_path(name: str) -> Path:
    p = DATASETS / f"{name}.csv"
    if not p.is_file():
        if name == "cardio":
            return ROOT / "data" / "cardio.csv"
        pytest.skip(f"dataset {name} not found under {DATASETS}")
    return p


def load_csv(name: str) -> tuple[np.ndarray, np.ndarray]:
    arr = np.loadtxt(dataset_path(name), delimiter=",", skiprows=1)
    return arr[:, :-1], arr[:, -1].astype(int)


@pytest.fixture
def rng(request):
    # fresh random inputs each run; the seed is printed on failure to reproduce
    seed = int(os.environ.get("OUTLIERD_TEST_SEED", np.random.SeedSequence().entropy % (2**32)))
    request.node.user_properties.append(("seed", seed))
    return np.random.default_rng(seed)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    seeds = [v for k, v in item.user_properties if k == "seed"]
    if report.failed and seeds:
        report.sections.append(("random seed", f"rerun with OUTLIERD_TEST_SEED={seeds[0]}"))


class LoopThread:
    """An asyncio loop running forever in a daemon thread; ``call`` runs a coroutine on it (the
    in-process servers of the server, feedback, rollout and threshold tests live on one)."""

    def __init__(self, name: str = "test-loop", timeout: float = 30.0) -> None:
        import asyncio
        import threading

        self._asyncio = asyncio
        self.timeout = timeout
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self.thread.start()

    def call(self, coro, timeout: float | None = None):
        return self._asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout or self.timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """``outlierd ARGS`` in this process (the console script's main: same parsing, same exit codes),
    with its stdout and stderr captured."""
    import contextlib
    import io

    from outlierd.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(list(args))
    return subprocess.CompletedProcess(args, rc, out.getvalue(), err.getvalue())


@contextlib.contextmanager
def small_server(root: Path, *, d: int, data_seed: int = 0, **settings):
    """A worker on 127.0.0.1 (port 0, no metrics port, drift off) serving model ``m`` version 1: an
    Isolation Forest of 10 trees fitted on 500 standard-normal rows of ``d`` features, published
    under ``root``. ``settings``: ServeSettings fields. Yields ``(worker, metrics registry)``."""
    from prometheus_client import CollectorRegistry
    from sklearn.ensemble import IsolationForest

    from outlierd.core.registry import Registry
    from outlierd.monitoring.metrics import ServiceMetrics
    from outlierd.server.app import start_worker
    from outlierd.server.settings import ServeSettings
    from outlierd.training.export import export_sklearn

    X = np.random.default_rng(data_seed).standard_normal((500, d))
    Registry(root / "reg").publish("m", export_sklearn(IsolationForest(n_estimators=10, random_state=0).fit(X), root / "a",
                                                       X_train=X), aliases=("champion",))
    loop = LoopThread()
    metrics = CollectorRegistry()
    kw = {"registry": root / "reg", "model": "m", "host": "127.0.0.1", "port": 0, "metrics_port": 0, "drift": 0, **settings}
    worker = loop.call(start_worker(ServeSettings(**kw), ServiceMetrics(metrics)))
    try:
        yield worker, metrics
    finally:
        loop.call(worker.stop(1.0))
        loop.close()
