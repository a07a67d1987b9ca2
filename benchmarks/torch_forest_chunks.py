"""GPU-only time of the torch forest walk by chunk size (data already on the device), beside the
end-to-end ``Model.score`` and the Numba CPU kernel in the same run. For choosing CHUNK_ROWS.

    python benchmarks/torch_forest_chunks.py [--rows 1000000]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np



def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    args = ap.parse_args()
    import torch
    from sklearn.ensemble import IsolationForest

    from outlierd.core import load_model
    from outlierd.core.forest_torch import TorchForest
    from outlierd.core.iforest import Forest
    from outlierd.training import export_sklearn

    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    rng = np.random.default_rng(0)
    Xtr = rng.standard_normal((20_000, 32)).astype(np.float32)
    path = export_sklearn(IsolationForest(n_estimators=100, max_samples=256, random_state=0).fit(Xtr),
                          Path(tempfile.mkdtemp()) / "f", X_train=Xtr)
    cpu, gpu = load_model(path), load_model(path, backend="torch", device="cuda")
    X = rng.standard_normal((args.rows, 32)).astype(np.float32)

    def best(fn, reps=5):
        fn()
        torch.cuda.synchronize()
        t = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            t = min(t, time.perf_counter() - t0)
        return t

    t_cpu = best(lambda: cpu.score(X))
    t_e2e = best(lambda: gpu.score(X))
    print(f"numba cpu {args.rows / t_cpu:,.0f} rec/s; torch cuda end to end {args.rows / t_e2e:,.0f} rec/s ({t_cpu / t_e2e:.2f}x)")
    forest = Forest.from_arrays(dict(np.load(Path(path) / "arrays.npz")), 32)
    Xd = torch.from_numpy(X).cuda()
    for chunk in (16_384, 65_536, 262_144, 1_048_576):
        tf = TorchForest(forest, "cuda", chunk_rows=chunk)
        def walk(tf=tf, chunk=chunk):
            with torch.inference_mode():
                for lo in range(0, args.rows, chunk):
                    tf.path_sums(Xd[lo:lo + chunk])
        t = best(walk)
        print(f"chunk {chunk:>9,}: walk on device {args.rows / t:,.0f} rec/s ({t * 1e3:.1f} ms; {t_cpu / t:.2f}x numba cpu)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
