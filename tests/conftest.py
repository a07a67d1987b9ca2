import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]

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
