"""GPU suite: the forest on each GPU backend (the custom CUDA kernel, torch, ONNX Runtime CUDA)
against the Numba CPU kernel by batch size, end to end from host memory, and the CPU/GPU
crossover batch size; for the CUDA kernel also its throughput on device-resident records (block
size x trees-per-thread sweep) and end to end from host memory at large batches (chunk size x
streams x host copy threads sweep), against the targets of 100 M and 50 M records/s.

Where no CUDA device is usable the suite says so and measures nothing; every other suite runs on
the CPU as usual. Scores on the device are checked against the Numba kernel before timing (1e-9
for the CUDA kernel, which reproduces the CPU kernel's float64 sums; 1e-5 for torch / ONNX).
"""

from __future__ import annotations

import math
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from .common import Progress, time_call

GPU_ATOL = 1e-5   # the torch / ONNX backends compute in float32 on the device
CUDA_ATOL = 1e-9  # the custom kernel: same float32 comparisons, same float64 sums in tree order
BATCHES = [1, 16, 256, 4096, 65_536, 262_144, 1_000_000]
GPU_BACKENDS = ("cuda", "torch", "onnx")
TARGET_DEVICE = 100e6   # records/s, 100 trees x 32 features, device-resident records
TARGET_E2E = 50e6       # records/s, from host memory
# the sweeps (full / quick): rows, kernel configurations, end-to-end configurations
DEVICE_ROWS = {False: [1 << 20, 4 << 20, 16 << 20], True: [1 << 18, 1 << 20]}
KERNEL_CONFIGS = {False: [(b, i) for b in (64, 128, 256) for i in (1, 2, 4)], True: [(128, 1), (128, 4)]}
E2E_THREADS = {False: [1, 2, 4, 8], True: [1, 4]}
E2E_LAYOUTS = {False: [(1 << 18, 3), (1 << 20, 2), (1 << 20, 4), (1 << 22, 2)], True: [(1 << 18, 3)]}


def crossover(points: list[dict[str, Any]], cpu_key: str = "cpu", gpu_key: str = "gpu") -> int | None:
    """The smallest batch from which the GPU stays faster than the CPU kernel at every larger
    batch measured (a single lucky point below a slower one does not count); None if never."""
    best = None
    for p in reversed(sorted(points, key=lambda p: p["batch"])):
        if p.get(gpu_key) is not None and p[gpu_key] > p[cpu_key]:
            best = p["batch"]
        else:
            break
    return best


def available() -> dict[str, bool]:
    from outlierd.core.backends import cuda_available

    return {b: cuda_available(b) for b in GPU_BACKENDS}


def _why_not(backend: str) -> str:
    return {"cuda": "numba.cuda.is_available() is False (no driver / device, or numba-cuda missing)",
            "torch": "torch not installed or torch.cuda.is_available() is False",
            "onnx": "no CUDAExecutionProvider in onnxruntime (onnxruntime-gpu not installed)"}[backend]


def no_gpu_reason() -> str:
    return ("no usable CUDA device (" + "; ".join(f"{b}: {_why_not(b)}" for b in GPU_BACKENDS)
            + "): GPU numbers not measured on this machine")


def run(forest_artifact: Path, cpu_model: Any, X: np.ndarray, budget_s: float, progress: Progress,
        quick: bool = False) -> dict[str, Any]:
    from outlierd.core import load_model

    have = available()
    if not any(have.values()):
        return {"available": False, "reason": no_gpu_reason()}
    backends, missing = {}, {b: _why_not(b) for b, ok in have.items() if not ok}
    for b, ok in have.items():
        if ok:
            try:
                backends[b] = load_model(forest_artifact, backend=b, device="cuda")
            except Exception as e:  # noqa: BLE001 - a backend that cannot start is reported, the others run
                missing[b] = f"{type(e).__name__}: {e}"
    if not backends:
        return {"available": False, "reason": "no GPU backend could start: " + "; ".join(f"{b}: {r}" for b, r in missing.items())}
    check = X[: min(100_000, X.shape[0])]
    ref = cpu_model.score(check)
    diffs = {b: float(np.max(np.abs(m.score(check) - ref))) for b, m in backends.items()}
    for b, d in diffs.items():
        if d > (CUDA_ATOL if b == "cuda" else GPU_ATOL):
            raise AssertionError(f"gpu: the {b} backend on cuda differs from the Numba kernel by {d:.3g}")
    points = []
    for n in [b for b in BATCHES if b <= X.shape[0]]:
        Xn = X[:n]
        progress.say(f"gpu: batch {n:,}")
        p: dict[str, Any] = {"batch": n, "cpu": time_call(partial(cpu_model.score, Xn), budget_s=budget_s).records_per_s(n)}
        for b, m in backends.items():
            p[b] = time_call(partial(m.score, Xn), budget_s=budget_s).records_per_s(n)
        p["gpu"] = max(p[b] for b in backends)
        points.append(p)
    out: dict[str, Any] = {
        "available": True, "backends": list(backends), "unavailable": missing, "max_abs_diff_vs_cpu": diffs, "points": points,
        "crossover_batch": crossover(points), "crossover_by_backend": {b: crossover(points, gpu_key=b) for b in backends},
        "device_name": _device_name(), "note": "end to end from host memory (the backend's Model.score)"}
    if "cuda" in backends:
        from outlierd.core.forest_cuda import simulated

        out["simulated"] = simulated()  # Numba's CUDA simulator (NUMBA_ENABLE_CUDASIM=1): the code path, not a GPU's speed
        out["cuda"] = cuda_kernel(backends["cuda"], cpu_model, X, budget_s, progress, quick)
    return out


def _device_name() -> str | None:
    try:
        from numba import cuda

        name = cuda.get_current_device().name
        return name.decode() if isinstance(name, bytes) else str(name)
    except Exception:  # noqa: BLE001 - the name is a nicety
        return None


def cuda_kernel(model: Any, cpu_model: Any, X: np.ndarray, budget_s: float, progress: Progress, quick: bool) -> dict[str, Any]:
    """The custom kernel alone: device-resident throughput (sweep of block x ILP, then the best at
    every size), end to end from host memory (sweep of host copy threads, chunk rows x streams), the
    copy bandwidths that bound the end-to-end path, and the targets."""
    from numba import cuda

    from outlierd.core.forest_cuda import CudaForest

    base = model._scorer.cuda_forest
    forest, prep = base.forest, model.preprocessing
    sizes = DEVICE_ROWS[quick]
    n_big = sizes[-1]
    with progress.step(f"gpu/cuda: {n_big:,} host rows (the bench rows, tiled)"):
        Xh = np.ascontiguousarray(np.tile(X, (math.ceil(n_big / X.shape[0]), 1))[:n_big])
        d_X = cuda.to_device(Xh)
        d_out = cuda.device_array(n_big, dtype=np.float64)
    res: dict[str, Any] = {"rows": sizes, "dtype": str(Xh.dtype), "features": int(Xh.shape[1]), "trees": forest.n_trees,
                           "depth": forest.depth}

    def device_rate(cf: CudaForest, n: int) -> float:
        def call() -> None:
            cf.score_device(d_X[:n], d_out[:n])
            cuda.synchronize()
        return time_call(call, budget_s=budget_s, max_rounds=5).records_per_s(n)

    # 1. device-resident: block x ILP at the middle size, then the best configuration at every size
    sweep_n = sizes[min(1, len(sizes) - 1)]
    sweep: list[dict[str, Any]] = []
    for block, ilp in KERNEL_CONFIGS[quick]:
        progress.say(f"gpu/cuda: device-resident, block {block}, {ilp} trees per step, {sweep_n:,} rows")
        cf = CudaForest(forest, prep, block=block, ilp=ilp)
        sweep.append({"block": block, "ilp": ilp, "rows": sweep_n, "records_per_s": device_rate(cf, sweep_n)})
    best = max(sweep, key=lambda s: s["records_per_s"])
    cf = CudaForest(forest, prep, block=best["block"], ilp=best["ilp"])
    by_size = [{"rows": n, "records_per_s": device_rate(cf, n)} for n in sizes]
    check_n = min(n_big, 200_000)
    cf.score_device(d_X[:check_n], d_out[:check_n])
    cuda.synchronize()
    diff = float(np.max(np.abs(d_out[:check_n].copy_to_host() - cpu_model.score(Xh[:check_n]))))
    if diff > CUDA_ATOL:
        raise AssertionError(f"gpu: the CUDA kernel on device-resident rows differs from the Numba kernel by {diff:.3g}")
    res["device_resident"] = {"sweep": sweep, "best": {"block": best["block"], "ilp": best["ilp"]}, "by_size": by_size,
                              "max_abs_diff_vs_cpu": diff, "records_per_s": max(p["records_per_s"] for p in by_size)}

    # 2. the copies that bound the end-to-end path: host -> pinned (NumPy), pinned -> device (DMA)
    n_copy = min(n_big, 1 << 22)
    pinned = cuda.pinned_array((n_copy, Xh.shape[1]), dtype=Xh.dtype)
    nbytes = pinned.nbytes
    t_host = time_call(lambda: np.copyto(pinned, Xh[:n_copy]), budget_s=budget_s, max_rounds=5).median_s
    d_tmp = cuda.device_array_like(pinned)

    def h2d() -> None:
        d_tmp.copy_to_device(pinned)
        cuda.synchronize()
    t_h2d = time_call(h2d, budget_s=budget_s, max_rounds=5).median_s
    res["copies"] = {"bytes": nbytes, "host_to_pinned_GBps": nbytes / t_host / 1e9, "pinned_to_device_GBps": nbytes / t_h2d / 1e9,
                     "bytes_per_record": Xh.shape[1] * Xh.itemsize}

    # 3. end to end from host memory: host copy threads, then chunk rows x streams
    def e2e_rate(**kw: Any) -> float:
        cfe = CudaForest(forest, prep, block=best["block"], ilp=best["ilp"], **kw)
        try:
            return time_call(partial(cfe.score, Xh), budget_s=budget_s, max_rounds=5).records_per_s(n_big)
        finally:
            cfe.close()
    e2e: list[dict[str, Any]] = []
    layout0 = E2E_LAYOUTS[quick][0]
    for threads in E2E_THREADS[quick]:
        progress.say(f"gpu/cuda: end to end, {n_big:,} rows, chunks of {layout0[0]:,}, {layout0[1]} streams, {threads} copy threads")
        e2e.append({"chunk_rows": layout0[0], "streams": layout0[1], "host_threads": threads,
                    "records_per_s": e2e_rate(chunk_rows=layout0[0], streams=layout0[1], host_threads=threads)})
    threads = max(e2e, key=lambda s: s["records_per_s"])["host_threads"]
    for chunk, streams in E2E_LAYOUTS[quick][1:]:
        progress.say(f"gpu/cuda: end to end, chunks of {chunk:,}, {streams} streams, {threads} copy threads")
        e2e.append({"chunk_rows": chunk, "streams": streams, "host_threads": threads,
                    "records_per_s": e2e_rate(chunk_rows=chunk, streams=streams, host_threads=threads)})
    best_e2e = max(e2e, key=lambda s: s["records_per_s"])
    res["end_to_end"] = {"rows": n_big, "sweep": e2e, "best": best_e2e, "records_per_s": best_e2e["records_per_s"]}
    res["targets"] = {"device_resident_records_per_s": TARGET_DEVICE, "end_to_end_records_per_s": TARGET_E2E,
                      "device_resident_met": res["device_resident"]["records_per_s"] >= TARGET_DEVICE,
                      "end_to_end_met": best_e2e["records_per_s"] >= TARGET_E2E}
    res["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    return res
