"""Run by tests/test_forest_cuda.py in a subprocess with NUMBA_ENABLE_CUDASIM=1 (Numba's CUDA
simulator, which must be chosen before numba.cuda is first imported, so not in pytest's process):
the CUDA backend against the Numba CPU kernel on small real models. Prints one JSON object.

    NUMBA_ENABLE_CUDASIM=1 python tests/cudasim_cases.py OUT_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from sklearn.ensemble import IsolationForest

from outlierd.core import load_model
from outlierd.core.errors import InvalidInputError
from outlierd.core.forest_cuda import CudaForest, simulated
from outlierd.core.iforest import Forest, numba_scorer
from outlierd.core.preprocess import Preprocessing
from outlierd.training import export_sklearn


def _records(rng: np.random.Generator, X: np.ndarray, n: int) -> np.ndarray:
    d = X.shape[1]
    Xt = np.concatenate([X[rng.integers(0, len(X), size=n // 2)], rng.normal(size=(n - n // 2, d)) * 50])
    Xt[rng.random(n) < 0.1, rng.integers(0, d)] = np.nan  # imputed with the medians
    Xt[rng.random(n) < 0.03, 0] = np.inf
    Xt[rng.random(n) < 0.03, d - 1] = -np.inf
    return Xt


def _diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b))) if a.shape == b.shape else float("inf")


def main(out: Path) -> dict:
    res: dict = {"simulated": simulated()}
    rng = np.random.default_rng(7)

    # 1. the backend as users load it: a real artifact, load_model(backend="cuda", device="cuda")
    X = rng.normal(size=(600, 5)) * rng.uniform(0.1, 100, size=5) + rng.normal(size=5) * 10
    path = export_sklearn(IsolationForest(n_estimators=6, max_samples=128, random_state=1).fit(X), out / "m", X_train=X)
    ref, gpu = load_model(path), load_model(path, backend="cuda", device="cuda")
    res["loaded"] = [gpu.backend, gpu.device]
    Xt = _records(rng, X, 300)
    res["model_f64"] = _diff(gpu.score(Xt), ref.score(Xt))
    X32 = Xt.astype(np.float32)
    res["model_f32"] = _diff(gpu.score(X32), ref.score(X32))
    res["model_empty"] = list(gpu.score(np.empty((0, 5))).shape)
    s, feat, _ = gpu.score_explain(Xt[:20], top_k=2)
    rs, rfeat, _ = ref.score_explain(Xt[:20], top_k=2)
    res["explain"] = [_diff(s, rs), bool(np.array_equal(feat, rfeat))]

    # 2. the class: a preprocessing that scales and centres (the device does it in float64, then
    #    rounds to float32, as the CPU kernel), batches split over chunks and streams, a batch not a
    #    multiple of the block, every ILP variant, the two-kernel path for wide records
    d = 7
    Xa = rng.normal(size=(800, d)) * 3 + 1
    art = export_sklearn(IsolationForest(n_estimators=9, max_samples=64, random_state=2).fit(Xa), out / "a", X_train=Xa)
    forest = Forest.from_arrays(dict(np.load(art / "arrays.npz")), d)
    prep = Preprocessing(np.median(Xa, axis=0), rng.normal(size=d), 1.0 / rng.uniform(0.5, 4, size=d), "impute")
    Xs = _records(rng, Xa, 333)  # 333 = 10 blocks of 32 + 13
    cpu = numba_scorer(forest, prep)(Xs, False)
    cases = {}
    for name, kw in {
        "one_chunk_block128_ilp4": {},
        "chunks64_streams2_block32_ilp4": {"chunk_rows": 64, "streams": 2, "block": 32},
        "chunks100_streams3_block64_ilp2": {"chunk_rows": 100, "streams": 3, "block": 64, "ilp": 2},
        "chunks50_streams1_block32_ilp1": {"chunk_rows": 50, "streams": 1, "block": 32, "ilp": 1},
        "global_prep_chunks128": {"chunk_rows": 128, "streams": 2, "smem_bytes": 16},
    }.items():
        cf = CudaForest(forest, prep, host_threads=2, **kw)
        cases[name] = {"diff": _diff(cf.score(Xs), cpu), "global_prep": cf.global_prep, "block": cf.block,
                       "reuse": _diff(cf.score(Xs[:37]), cpu[:37])}  # the same buffers again, a smaller batch
    X32 = Xs.astype(np.float32)
    cases["one_chunk_block128_ilp4"]["f32"] = _diff(CudaForest(forest, prep, chunk_rows=64).score(X32),
                                                    numba_scorer(forest, prep)(X32, False))
    res["cases"] = cases

    # the device-resident path
    from numba import cuda

    cf = CudaForest(forest, prep, block=32)
    d_out, d_bad = cf.score_device(cuda.to_device(np.ascontiguousarray(Xs)))
    res["device_resident"] = [_diff(d_out.copy_to_host(), cpu), int(d_bad.copy_to_host()[0]) == np.iinfo(np.int64).max]

    # 3. the reject policy: the first offending row is named, wherever its chunk is
    rej = Preprocessing(prep.median, prep.center, prep.scale_inv, "reject")
    Xr = np.nan_to_num(Xs, nan=0.0, posinf=1.0, neginf=-1.0)
    Xr[201, 3] = np.nan
    Xr[250, 0] = np.inf
    msgs = {}
    for name, kw in {"one_chunk": {}, "chunks64": {"chunk_rows": 64, "streams": 2, "block": 32},
                     "global_prep": {"chunk_rows": 64, "smem_bytes": 16}}.items():
        try:
            CudaForest(forest, rej, **kw).score(Xr)
            msgs[name] = None
        except InvalidInputError as e:
            msgs[name] = str(e)
    try:
        numba_scorer(forest, rej)(Xr, False)
        msgs["cpu"] = None
    except InvalidInputError as e:
        msgs["cpu"] = str(e)
    res["reject"] = msgs
    res["reject_clean"] = _diff(CudaForest(forest, rej, chunk_rows=64, block=32).score(Xr[:200]),
                                numba_scorer(forest, rej)(Xr[:200], False))
    return res


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]))))
