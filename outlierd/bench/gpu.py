"""GPU suite: the forest on each GPU backend (torch, ONNX Runtime CUDA) against the Numba CPU
kernel by batch size, end to end from host memory, and the CPU/GPU crossover batch size.

Where no CUDA device is usable the suite says so and measures nothing; every other suite runs on
the CPU as usual. Scores on the device are checked against the Numba kernel before timing.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from .common import Progress, time_call

GPU_ATOL = 1e-5   # the torch / ONNX backends compute in float32 on the device
BATCHES = [1, 16, 256, 4096, 65_536, 262_144, 1_000_000]


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

    return {b: cuda_available(b) for b in ("torch", "onnx")}


def run(forest_artifact: Path, cpu_model: Any, X: np.ndarray, budget_s: float, progress: Progress) -> dict[str, Any]:
    from outlierd.core import load_model

    have = available()
    if not any(have.values()):
        return {"available": False, "reason": "no usable CUDA device (torch.cuda unavailable or torch not installed; no "
                                              "CUDAExecutionProvider in onnxruntime): GPU numbers not measured on this machine"}
    backends = {}
    for b, ok in have.items():
        if ok:
            backends[b] = load_model(forest_artifact, backend=b, device="cuda")
    check = X[: min(100_000, X.shape[0])]
    ref = cpu_model.score(check)
    diffs = {b: float(np.max(np.abs(m.score(check) - ref))) for b, m in backends.items()}
    for b, d in diffs.items():
        if d > GPU_ATOL:
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
    return {"available": True, "backends": list(backends), "max_abs_diff_vs_cpu": diffs, "points": points,
            "crossover_batch": crossover(points), "note": "end to end from host memory (the backend's Model.score)"}
