"""Run by tests/test_forest_cuda.py with NUMBA_ENABLE_CUDASIM=1: the bench's gpu suite end to end
under Numba's CUDA simulator on a small forest and tiny sizes (the code path a GPU machine runs),
then its report. Prints the gpu results as JSON.

    NUMBA_ENABLE_CUDASIM=1 python tests/cudasim_bench.py OUT_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from sklearn.ensemble import IsolationForest

from outlierd.bench import gpu, report
from outlierd.bench.common import Progress, machine
from outlierd.core import load_model
from outlierd.training import export_sklearn


def main(out: Path) -> dict:
    gpu.BATCHES = [1, 200]
    gpu.DEVICE_ROWS = {True: [64, 200]}
    gpu.KERNEL_CONFIGS = {True: [(64, 4)]}
    gpu.E2E_THREADS = {True: [2]}
    gpu.E2E_LAYOUTS = {True: [(64, 2)]}
    rng = np.random.default_rng(3)
    X = rng.standard_normal((400, 6)).astype(np.float32)
    path = export_sklearn(IsolationForest(n_estimators=4, max_samples=64, random_state=0).fit(X), out / "m", X_train=X)
    res = gpu.run(path, load_model(path), X[:200], 0.0, Progress(quiet=True), quick=True)
    results = {"date": "sim", "quick": True, "suites": ["gpu"], "notes": [], "gpu": res, "machine": machine(), "wall_s": 0.0}
    report.write(results, out / "report")
    return res


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]))))
