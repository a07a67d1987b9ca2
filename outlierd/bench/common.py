"""Timing, machine description and progress lines shared by the suites."""

from __future__ import annotations

import os
import platform
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

N_FEATURES = 32
N_TREES = 100
MAX_SAMPLES = 256
TRAIN_ROWS = 100_000
SEED = 20240601


@dataclass(frozen=True)
class Timing:
    """Seconds per call over ``rounds`` rounds (each round: ``iterations`` back-to-back calls)."""

    median_s: float
    min_s: float
    rounds: int
    iterations: int

    def records_per_s(self, rows: int) -> float:
        return rows / self.median_s if self.median_s > 0 else float("inf")


def time_call(fn: Callable[[], Any], *, budget_s: float, max_rounds: int = 7, min_rounds: int = 3) -> Timing:
    """Median seconds per ``fn()`` call. One untimed warm-up call (JIT, caches); calls that take
    less than a millisecond are batched into rounds of several, so the timer's own cost is noise."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    iterations = max(1, min(10_000, int(1e-3 / max(first, 1e-7))))
    enough = min_rounds if first * min_rounds <= budget_s else 1  # a very slow peer: one round is all we afford
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_rounds and (len(times) < enough or time.perf_counter() - start < budget_s):
        t = time.perf_counter()
        for _ in range(iterations):
            fn()
        times.append((time.perf_counter() - t) / iterations)
    return Timing(float(np.median(times)), float(np.min(times)), len(times), iterations)


def latency_percentiles(fn: Callable[[], Any], *, calls: int, budget_s: float) -> dict[str, float]:
    """p50 / p99 / p99.9 / mean (microseconds) of single calls, each timed on its own; at most
    ``calls`` calls or ``budget_s`` seconds after a warm-up."""
    for _ in range(10):
        fn()
    lat: list[int] = []
    deadline = time.perf_counter() + budget_s
    while len(lat) < calls and time.perf_counter() < deadline:
        t = time.perf_counter_ns()
        fn()
        lat.append(time.perf_counter_ns() - t)
    a = np.asarray(lat, dtype=np.float64) / 1e3
    return {"calls": int(a.size), "p50_us": float(np.percentile(a, 50)), "p99_us": float(np.percentile(a, 99)),
            "p99.9_us": float(np.percentile(a, 99.9)), "mean_us": float(a.mean()), "min_us": float(a.min())}


def loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def machine() -> dict[str, Any]:
    """CPU model, cores, memory, GPU, library versions, the exact command."""
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    info: dict[str, Any] = {"cpu": cpu, "logical_cpus": os.cpu_count(), "platform": platform.platform(),
                            "python": platform.python_version(), "command": " ".join(["outlierd", *sys.argv[1:]])
                            if os.path.basename(sys.argv[0]) == "outlierd" else " ".join(sys.argv)}
    try:
        info["usable_cpus"] = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        pass
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            kb = next(int(ln.split()[1]) for ln in f if ln.startswith("MemTotal"))
        info["memory_gib"] = round(kb / 2**20, 1)
    except (OSError, StopIteration, ValueError):
        pass
    versions = {}
    for mod in ("outlierd", "numpy", "numba", "sklearn", "onnxruntime", "skl2onnx", "grpc", "torch", "matplotlib"):
        if mod == "torch" and "torch" not in sys.modules:
            continue  # importing torch costs seconds; only report it when a suite used it
        try:
            versions[mod] = getattr(__import__(mod), "__version__", "?")
        except Exception:  # noqa: BLE001 - a missing peer just goes unreported
            pass
    info["versions"] = versions
    try:
        import numba

        info["numba_threads"] = numba.get_num_threads()
    except Exception:  # noqa: BLE001
        pass
    info["gpu"] = gpu_name()
    info["loadavg"] = loadavg()
    return info


def gpu_name() -> str | None:
    """The CUDA device's name when one is usable here, else None (torch only if already imported)."""
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        if torch.cuda.is_available():
            return str(torch.cuda.get_device_name(0))
    try:
        from outlierd.core.backends import numba_cuda_available

        if numba_cuda_available():
            from numba import cuda

            name = cuda.get_current_device().name
            return name.decode() if isinstance(name, bytes) else str(name)
    except Exception:  # noqa: BLE001 - the name is a nicety
        pass
    try:
        import onnxruntime as ort

        if "CUDAExecutionProvider" in ort.get_available_providers():
            return "CUDA (onnxruntime CUDAExecutionProvider)"
    except ImportError:
        pass
    return None


class Progress:
    """Progress lines on stderr: ``[bench 12.3s] kernels: iforest batch 65,536 ...``."""

    def __init__(self, quiet: bool = False):
        self.t0 = time.perf_counter()
        self.quiet = quiet

    def say(self, msg: str) -> None:
        if not self.quiet:
            print(f"[bench {time.perf_counter() - self.t0:5.1f}s] {msg}", file=sys.stderr, flush=True)

    @contextmanager
    def step(self, what: str) -> Iterator[None]:
        self.say(f"{what} ...")
        t = time.perf_counter()
        yield
        self.say(f"{what}: {time.perf_counter() - t:.1f} s")
