"""Scoring backends: the Numba kernels (CPU) and array programs (ONNX Runtime, torch; CPU or CUDA).

A backend turns validated records into scores. ``NumbaScorer`` runs the fused kernels (the
preprocessing happens inside them); ``ArrayScorer`` applies the same preprocessing in NumPy, then
hands float32 records to an array program. Each builder is registered per (detector, backend);
``core.model.load_model(path, backend=..., device=...)`` picks one.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import numba as nb
import numpy as np

from .errors import BackendUnavailableError, DeviceError, InvalidInputError, UnsupportedError  # DeviceError was defined here once: still importable
from .explain import empty_outputs
from .preprocess import Preprocessing, prep_into_parallel, prep_into_serial

BACKENDS = ("numba", "onnx", "torch", "cuda")  # cuda: the custom CUDA kernel (core.forest_cuda, numba-cuda)
DEVICES = ("cpu", "cuda", "auto")
# Up to this many rows the single-threaded kernel is cheaper than waking the thread pool.
SERIAL_MAX_ROWS = 1024
# Numba picks its threading layer at run time (omp, tbb or workqueue); workqueue must not be
# entered by two Python threads at once. One lock per process serialises the parallel kernels,
# which use every core anyway, so the choice of layer never matters for correctness.
_PARALLEL_LOCK = threading.Lock()


def _reject_message(row: int) -> str:
    return f"record {row} contains NaN or inf and this model's missing-value policy is 'reject'"


class NumbaScorer:
    """The fused Numba kernels. ``explain``: ``(explain_serial, explain_parallel, extra)``, kernels
    taking ``(X, out, features, contributions, flag_threshold, flagged_only, <score args>, *extra)``
    that score exactly as the scoring kernels do and explain the rows they are asked to; ``extra``
    is a tuple or a callable returning one (computed once, on the first explanation)."""

    backend, device = "numba", "cpu"

    def __init__(self, serial: Callable, parallel: Callable, prep: Preprocessing, params: tuple,
                 explain: tuple[Callable, Callable, Any] | None = None):
        self._serial, self._parallel = serial, parallel
        self._args = (prep.median, prep.center, prep.scale_inv, prep.reject, *params)
        self._explain = explain
        self._explain_lock = threading.Lock()

    def __call__(self, X: np.ndarray, parallel: bool | None = None) -> np.ndarray:
        n = X.shape[0]
        out = np.empty(n, dtype=np.float64)
        if not parallel if parallel is not None else n <= SERIAL_MAX_ROWS:
            bad = self._serial(X, out, *self._args)
        else:
            with _PARALLEL_LOCK:
                bad = self._parallel(X, out, *self._args, nb.get_num_threads())
        if bad >= 0:
            raise InvalidInputError(_reject_message(int(bad)))
        return out

    def _explain_kernels(self) -> tuple[Callable, Callable, tuple]:
        if self._explain is None:
            raise UnsupportedError("this detector has no explanation kernel")
        serial, parallel, extra = self._explain
        if callable(extra):
            with self._explain_lock:  # computed once even when several scoring threads ask at once
                serial, parallel, extra = self._explain
                if callable(extra):
                    extra = extra()
                    self._explain = (serial, parallel, extra)
        return serial, parallel, extra

    def explain(self, X: np.ndarray, top_k: int, threshold: float, flagged_only: bool,
                parallel: bool | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(scores, features, contributions)`` in one pass: the scores equal ``self(X)``; records are
        explained when ``not flagged_only`` or ``score >= threshold`` (the others: -1 / NaN)."""
        serial, par, extra = self._explain_kernels()
        n = X.shape[0]
        out = np.empty(n, dtype=np.float64)
        feat = np.empty((n, top_k), dtype=np.int64)
        contrib = np.empty((n, top_k), dtype=np.float64)
        args = (float(threshold), bool(flagged_only), *self._args, *extra)
        if not parallel if parallel is not None else n <= SERIAL_MAX_ROWS:
            bad = serial(X, out, feat, contrib, *args)
        else:
            with _PARALLEL_LOCK:
                bad = par(X, out, feat, contrib, *args, nb.get_num_threads())
        if bad >= 0:
            raise InvalidInputError(_reject_message(int(bad)))
        return out, feat, contrib

    def top_k(self, X: np.ndarray, top_k: int, parallel: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(features, contributions)`` of every record (the fallback explainer of array backends)."""
        _, feat, contrib = self.explain(X, top_k, np.inf, False, parallel)
        return feat, contrib


class ArrayScorer:
    """Preprocess in NumPy (same rules as the kernels), then run ``fn(records as dtype) -> scores``
    (float32 by default; float64 for programs that must reproduce float64 scores exactly).

    ``explain_fn(X, top_k) -> (features, contributions)`` explains raw (validated, not yet
    preprocessed) records: the graph's own per-feature output, or a Numba kernel on the same arrays."""

    def __init__(self, fn: Callable[[np.ndarray], np.ndarray], prep: Preprocessing, backend: str, device: str,
                 dtype: type = np.float32, explain_fn: Callable[..., tuple[np.ndarray, np.ndarray]] | None = None):
        self._fn, self._prep, self.backend, self.device, self._dtype = fn, prep, backend, device, dtype
        self._explain_fn = explain_fn

    def explain(self, X: np.ndarray, top_k: int, threshold: float, flagged_only: bool,
                parallel: bool | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(scores, features, contributions)``: scores from this backend (equal to ``self(X)``),
        attributions from ``explain_fn`` for all records or only those with ``score >= threshold``."""
        if self._explain_fn is None:
            raise UnsupportedError(f"the {self.backend} backend of this detector has no explanations")
        scores = self(X, parallel)
        if not flagged_only:
            feat, contrib = self._explain_fn(X, top_k)
            return scores, feat, contrib
        feat, contrib = empty_outputs(X.shape[0], top_k)
        rows = np.flatnonzero(scores >= threshold)
        if rows.size:
            feat[rows], contrib[rows] = self._explain_fn(X[rows], top_k)
        return scores, feat, contrib

    def __call__(self, X: np.ndarray, parallel: bool | None = None) -> np.ndarray:
        n = X.shape[0]
        if n == 0:
            return np.empty(0, dtype=np.float64)
        # the fused Numba step, not Preprocessing.transform: NumPy's version took ~0.3-0.7 s per
        # million 32-feature rows, several times the GPU's own time for them (measured on an H200)
        p = self._prep
        Xp: np.ndarray = np.empty(X.shape, dtype=self._dtype)
        if not parallel if parallel is not None else n <= SERIAL_MAX_ROWS:
            bad = prep_into_serial(X, p.median, p.center, p.scale_inv, p.reject, Xp)
        else:
            with _PARALLEL_LOCK:
                bad = prep_into_parallel(X, p.median, p.center, p.scale_inv, p.reject, Xp)
        if bad >= 0:
            raise InvalidInputError(_reject_message(int(bad)))
        return np.asarray(self._fn(Xp), dtype=np.float64).reshape(-1)


# (detector kind, backend) -> builder(detector, arrays, n_features, prep, device, files) -> scorer
Builder = Callable[[dict, dict, int, Preprocessing, str, dict], Any]
BUILDERS: dict[tuple[str, str], Builder] = {}
# the backend a detector uses when the default (numba) does not exist for it
NATIVE_BACKEND: dict[str, str] = {}


def register(kind: str, backend: str, native: bool = False) -> Callable[[Builder], Builder]:
    def deco(fn: Builder) -> Builder:
        BUILDERS[(kind, backend)] = fn
        if native:
            NATIVE_BACKEND[kind] = backend
        return fn
    return deco


def cuda_available(backend: str | None = None) -> bool:
    """True when a CUDA device can run here for ``backend`` ("onnx": ONNX Runtime's CUDA provider;
    "torch": torch.cuda; "cuda": numba's CUDA target, the custom kernel's; None: any of them).
    torch is imported only when asked about and installed."""
    if backend in (None, "onnx"):
        try:
            import onnxruntime as ort

            if "CUDAExecutionProvider" in ort.get_available_providers():
                return True
        except ImportError:
            pass
    if backend in (None, "cuda") and numba_cuda_available():
        return True
    if backend in (None, "torch"):
        try:
            import torch

            return bool(torch.cuda.is_available())
        except ImportError:
            return False
    return False


def numba_cuda_available() -> bool:
    """numba's CUDA target can run kernels here (a driver and a device; under Numba's CUDA simulator,
    ``NUMBA_ENABLE_CUDASIM=1``, the simulator counts as one)."""
    try:
        from numba import cuda

        return bool(cuda.is_available())
    except Exception:  # noqa: BLE001 - a numba without its CUDA target, or a driver that fails to load
        return False


def resolve_device(device: str, backend: str) -> str:
    """'auto' -> 'cuda' when the backend can use a present GPU, else 'cpu'; 'cuda' without one fails."""
    if device not in DEVICES:
        raise InvalidInputError(f"device must be one of {DEVICES}; got {device!r}")
    if backend == "numba":
        if device == "cuda":
            raise DeviceError("the numba backend runs on the CPU; for --device cuda use --backend cuda, onnx or torch "
                              "(or --device cpu / auto with the numba backend)")
        return "cpu"
    if device == "cpu":
        return "cpu"
    if cuda_available(backend):
        return "cuda"
    if device == "cuda" and backend == "cuda":
        raise DeviceError("--device cuda: no usable CUDA device for the cuda backend (numba.cuda.is_available() is False: "
                          "no NVIDIA driver or GPU here, or numba-cuda is not installed); install the 'cuda' extra on a "
                          "GPU machine, or use --device auto (the Numba kernel on the CPU)")
    if device == "cuda":
        raise DeviceError("--device cuda: no usable CUDA device (no CUDAExecutionProvider in onnxruntime and "
                          "torch.cuda.is_available() is False); install the 'gpu' extra on a GPU machine, or use --device auto")
    return "cpu"


def import_torch(device: str) -> Any:
    """torch, for a builder that needs it on ``device`` (a clear error when it is missing or cannot
    reach CUDA)."""
    try:
        import torch
    except ImportError as e:
        raise BackendUnavailableError("the torch backend needs the torch extra: pip install 'outlierd[torch]'") from e
    if device == "cuda" and not torch.cuda.is_available():
        raise DeviceError("--device cuda: torch.cuda.is_available() is False here (a CPU-only torch build or no "
                          "usable GPU); install a CUDA build of torch on a GPU machine, or use --device cpu")
    return torch
