"""Isolation Forest on a CUDA GPU: a custom kernel for the complete-tree walk (Numba's CUDA target).

The kernel is the Numba CPU kernel's walk (:mod:`core.iforest`), one GPU thread per record:

- **Preprocessing on the device, fused.** A thread block copies its rows of the *raw* records
  (float32 or float64, as the caller gave them; coalesced: consecutive threads read consecutive
  values) into shared memory, applying :func:`core.preprocess.prep_block`'s rules on the way
  (NaN -> median / +-inf -> +-FLOAT32_MAX under ``impute``; under ``reject`` the first such row is
  recorded with an atomic min and the host raises), computing ``(v - center) * scale_inv`` in
  float64 and rounding to float32 as the CPU kernel does. Rows are stored ``d + 1`` floats apart so
  that threads reading the same feature of different rows hit different banks.
- **The walk.** ``i = 2i + 1 + (x[f[i]] > t[i])`` for ``D`` levels per tree, the trees' split
  features, float32 thresholds and float64 leaf values in device memory (330 KB for 100 trees of
  depth 8: L2-resident). ``ILP`` trees are walked at once per thread (independent load chains),
  and leaf values are summed in tree order, so the float64 sum is bit-identical to the CPU
  kernel's; thresholds compare float32 to float32 exactly as on the CPU. The score
  ``2 ** (-sum / denominator)`` is the device's float64 ``pow`` (within an ulp or two of the CPU's).
- **Records with many features** (a block's rows would not fit in shared memory) take a two-kernel
  path: preprocess into a float32 device buffer, then walk it from global memory.
- **Host <-> device.** Batches are cut into chunks; each of ``streams`` CUDA streams owns pinned
  host buffers and device buffers for one chunk. Per chunk: copy the rows into the stream's pinned
  buffer (``host_threads`` threads: NumPy releases the GIL for the copy), enqueue the host->device
  copy, the kernel and the device->host copy of the scores on the stream, and move on; a stream's
  scores are collected when it is next needed (or at the end). So the copies and the kernel of
  consecutive chunks overlap, and the host copy of one chunk overlaps the GPU work of the others.

``CudaForest.score(X)`` is the whole path from host memory; ``score_device`` runs the kernel on
device-resident records (the device-only throughput). Without a usable GPU, building a
:class:`CudaForest` raises :class:`~core.errors.DeviceError` saying what is missing (numba's CUDA
target, the ``numba-cuda`` package, a driver or a device). Runs under Numba's CUDA simulator
(``NUMBA_ENABLE_CUDASIM=1``) too, which is how the kernel is tested on machines without a GPU.

Explanations: scores from the GPU, attributions from the Numba explanation kernel on the CPU (as
for the ONNX and torch backends).
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from .backends import ArrayScorer, _reject_message, register
from .errors import BackendUnavailableError, DeviceError, InvalidInputError
from .iforest import Forest, numba_explainer
from .preprocess import Preprocessing

BLOCK = 128                 # threads (= records) per block
ILP = 4                     # trees walked at once per thread
CHUNK_ROWS = 262_144        # records per stream per step
STREAMS = 3                 # CUDA streams (chunks in flight)
SMEM_BYTES = 48 * 1024      # shared memory a block may take without opting in to more
NO_REJECT = np.iinfo(np.int64).max


def import_cuda() -> Any:
    """``numba.cuda`` when a CUDA device can run this backend's kernels, else a DeviceError that
    says what is missing."""
    try:
        from numba import cuda
    except ImportError as e:  # a numba without its CUDA target
        raise DeviceError(f"--backend cuda: numba's CUDA target cannot be imported ({e}); install the 'cuda' extra "
                          "(pip install 'outlierd[cuda]': numba-cuda) on a GPU machine, or use --device cpu / auto") from e
    if not cuda.is_available():
        raise DeviceError("--backend cuda --device cuda: no usable CUDA device for numba (numba.cuda.is_available() is "
                          "False: no NVIDIA driver / GPU here, or numba cannot find the CUDA libraries; install the 'cuda' "
                          "extra, numba-cuda, on a GPU machine), or use --device cpu / auto")
    return cuda


def simulated() -> bool:
    """True when Numba's CUDA simulator stands in for a GPU (``NUMBA_ENABLE_CUDASIM=1``)."""
    from numba.core import config

    return bool(getattr(config, "ENABLE_CUDASIM", 0))


def kernels(ilp: int = ILP) -> tuple[Any, Any, Any]:
    """``(score_smem, prep_global, walk_global)`` for ``ilp`` trees per step (compiled lazily, per
    argument types, on first launch). numba.cuda is imported here, not with the module."""
    from . import forest_cuda_kernels

    return forest_cuda_kernels.kernels(ilp)


class _Slot:
    """One stream's buffers for one chunk: pinned host in/out, device in/out, the reject flag."""

    def __init__(self, cuda: Any, rows: int, d: int, dtype: np.dtype, global_prep: bool):
        self.stream = cuda.stream()
        self.rows = rows
        self.h_in = cuda.pinned_array((rows, d), dtype=dtype)
        self.h_out = cuda.pinned_array(rows, dtype=np.float64)
        self.h_bad = cuda.pinned_array(1, dtype=np.int64)
        self.h_init = cuda.pinned_array(1, dtype=np.int64)
        self.h_init[0] = NO_REJECT
        self.d_in = cuda.device_array((rows, d), dtype=dtype)
        self.d_out = cuda.device_array(rows, dtype=np.float64)
        self.d_bad = cuda.device_array(1, dtype=np.int64)
        self.d_prep = cuda.device_array(rows * d, dtype=np.float32) if global_prep else None
        self.pending: tuple[int, int] | None = None  # (lo, hi) rows whose scores are in flight


class CudaForest:
    """The forest on a CUDA device: ``score(X)`` from host memory (raw records, float32 or float64,
    preprocessed on the device) -> float64 scores equal to the Numba kernel's.

    ``block``: threads (records) per block; ``ilp``: trees walked at once per thread (1, 2 or 4);
    ``chunk_rows``: records per stream per step; ``streams``: chunks in flight; ``host_threads``:
    threads copying records into the pinned buffers; ``smem_bytes``: the shared memory a block may
    use (records too wide for it take the two-kernel path)."""

    backend, device = "cuda", "cuda"

    def __init__(self, forest: Forest, prep: Preprocessing, *, block: int = BLOCK, ilp: int = ILP,
                 chunk_rows: int = CHUNK_ROWS, streams: int = STREAMS, host_threads: int | None = None,
                 smem_bytes: int = SMEM_BYTES):
        cuda = import_cuda()
        if block < 1 or block > 1024 or chunk_rows < 1 or streams < 1:
            raise InvalidInputError("block must be in [1, 1024], chunk_rows and streams >= 1")
        self.cuda = cuda
        self.forest = forest
        self.n_features = d = int(prep.median.shape[0])
        self.depth = forest.depth
        self.denominator = float(forest.denominator)
        self.reject = bool(prep.reject)
        self.ilp = ilp
        self.chunk_rows = chunk_rows
        self.n_streams = streams
        self.host_threads = host_threads if host_threads is not None else max(1, min(4, (os.cpu_count() or 1) // 2))
        # shared memory: the block's rows, d + 1 floats apart; fewer threads per block for wide records,
        # and records too wide for even a warp's rows take the two-kernel path through global memory
        per_row = (d + 1) * 4
        fit = smem_bytes // per_row
        self.global_prep = fit < min(block, 32)
        self.block = block if self.global_prep else min(block, fit)
        if not self.global_prep and self.block >= 32:
            self.block -= self.block % 32
        self.smem = 0 if self.global_prep else self.block * per_row
        self._score_smem, self._prep_global, self._walk_global = kernels(ilp)
        self.d_median = cuda.to_device(np.ascontiguousarray(prep.median, dtype=np.float64))
        self.d_center = cuda.to_device(np.ascontiguousarray(prep.center, dtype=np.float64))
        self.d_scale_inv = cuda.to_device(np.ascontiguousarray(prep.scale_inv, dtype=np.float64))
        self.d_feature = cuda.to_device(np.ascontiguousarray(forest.feature))
        self.d_threshold = cuda.to_device(np.ascontiguousarray(forest.threshold, dtype=np.float32))
        self.d_leaf = cuda.to_device(np.ascontiguousarray(forest.leaf_value, dtype=np.float64))
        self._slots: dict[np.dtype, list[_Slot]] = {}
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None

    # ------------------------------------------------------------------ launches
    def _launch(self, d_X: Any, n: int, d_out: Any, d_bad: Any, stream: Any, d_prep: Any = None) -> None:
        """Enqueue the scoring of the first ``n`` device records ``d_X`` into ``d_out`` on ``stream``."""
        if n == 0:
            return
        args = (self.d_median, self.d_center, self.d_scale_inv, self.reject)
        tree = (self.d_feature, self.d_threshold, self.d_leaf, self.depth)
        if not self.global_prep:
            grid = (n + self.block - 1) // self.block
            self._score_smem[grid, self.block, stream, self.smem](d_X, n, *args, *tree, self.denominator, d_out, d_bad)
            return
        d = self.n_features
        if d_prep is None:
            d_prep = self.cuda.device_array(n * d, dtype=np.float32, stream=stream)
        self._prep_global[(n * d + 255) // 256, 256, stream](d_X, n, *args, d_prep, d_bad)
        self._walk_global[(n + self.block - 1) // self.block, self.block, stream](d_prep, n, d, *tree, self.denominator, d_out)

    def score_device(self, d_X: Any, d_out: Any | None = None, stream: Any = 0) -> tuple[Any, Any]:
        """Score device-resident raw records ``d_X`` (n, d) into ``d_out`` (float64, n) on ``stream``
        without waiting; returns ``(d_out, d_bad)`` (``d_bad[0] < 2**63 - 1``: the first row to
        reject). The device-only path: the caller synchronises."""
        n = int(d_X.shape[0])
        if d_out is None:
            d_out = self.cuda.device_array(n, dtype=np.float64, stream=stream)
        d_bad = self.cuda.to_device(np.array([NO_REJECT], dtype=np.int64), stream=stream)
        self._launch(d_X, n, d_out, d_bad, stream)
        return d_out, d_bad

    # ------------------------------------------------------------------ from host memory
    def _slots_for(self, dtype: np.dtype, n: int) -> list[_Slot]:
        need = min(self.chunk_rows, n)
        slots = self._slots.get(dtype)
        if slots is None or slots[0].rows < need:  # (re)allocate: the next power of two, at most a chunk
            rows = min(self.chunk_rows, 1 << (need - 1).bit_length())
            slots = [_Slot(self.cuda, rows, self.n_features, dtype, self.global_prep) for _ in range(self.n_streams)]
            self._slots[dtype] = slots
        return slots

    def _copy_in(self, dst: np.ndarray, src: np.ndarray) -> None:
        n = src.shape[0]
        parts = self.host_threads if n * src.shape[1] * src.itemsize >= (4 << 20) else 1
        if parts <= 1:
            np.copyto(dst, src)
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.host_threads, thread_name_prefix="outlierd-cuda-copy")
        cuts = [n * k // parts for k in range(parts + 1)]
        list(self._pool.map(lambda k: np.copyto(dst[cuts[k]:cuts[k + 1]], src[cuts[k]:cuts[k + 1]]), range(parts)))

    def _collect(self, slot: _Slot, out: np.ndarray) -> int:
        """Wait for the slot's chunk; copy its scores out; returns the first rejected row or -1."""
        if slot.pending is None:
            return -1
        slot.stream.synchronize()
        lo, hi = slot.pending
        slot.pending = None
        out[lo:hi] = slot.h_out[: hi - lo]
        bad = int(slot.h_bad[0])
        return lo + bad if bad != NO_REJECT else -1

    def score(self, X: np.ndarray) -> np.ndarray:
        """Raw records (n, d), float32 or float64, C-contiguous -> float64 scores (n,). Raises
        InvalidInputError for a non-finite value under the ``reject`` policy (naming the first row)."""
        X = np.ascontiguousarray(X)
        if X.dtype not in (np.float32, np.float64):
            X = X.astype(np.float64)
        n = X.shape[0]
        out = np.empty(n, dtype=np.float64)
        if n == 0:
            return out
        with self._lock:  # one batch at a time owns the streams' buffers
            slots = self._slots_for(X.dtype, n)
            C = slots[0].rows
            first_bad = -1
            try:
                for k, lo in enumerate(range(0, n, C)):
                    hi = min(lo + C, n)
                    slot = slots[k % len(slots)]
                    bad = self._collect(slot, out)
                    if bad >= 0 and first_bad < 0:
                        first_bad = bad
                    m = hi - lo
                    self._copy_in(slot.h_in[:m], X[lo:hi])
                    s = slot.stream
                    slot.d_bad.copy_to_device(slot.h_init, stream=s)
                    slot.d_in[:m].copy_to_device(slot.h_in[:m], stream=s)
                    self._launch(slot.d_in[:m], m, slot.d_out, slot.d_bad, s, slot.d_prep)
                    slot.d_out[:m].copy_to_host(slot.h_out[:m], stream=s)
                    slot.d_bad.copy_to_host(slot.h_bad, stream=s)
                    slot.pending = (lo, hi)
            finally:
                # chunks complete in issue order per stream; collect every stream (also after an error)
                pending = sorted((sl for sl in slots if sl.pending is not None), key=lambda sl: sl.pending[0])  # type: ignore[index]
                for slot in pending:
                    bad = self._collect(slot, out)
                    if bad >= 0 and (first_bad < 0 or bad < first_bad):
                        first_bad = bad
        if first_bad >= 0:
            raise InvalidInputError(_reject_message(first_bad))
        return out

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None


class CudaScorer(ArrayScorer):
    """The backend's scorer: records go to the GPU raw (preprocessed there), not through
    ArrayScorer's host preprocessing; explanations as ArrayScorer's (Numba on the CPU)."""

    def __init__(self, forest: CudaForest, prep: Preprocessing, explain_fn: Any = None):
        super().__init__(forest.score, prep, "cuda", "cuda", np.float64, explain_fn)
        self.cuda_forest = forest

    def __call__(self, X: np.ndarray, parallel: bool | None = None) -> np.ndarray:
        return self.cuda_forest.score(X)


@register("iforest", "cuda")
def _iforest_cuda(detector, arrays, d, prep, device, files):
    forest = Forest.from_arrays(arrays, d)
    if device != "cuda":  # --device cpu, or auto without a GPU: the Numba kernel on the CPU
        from .iforest import numba_scorer

        return numba_scorer(forest, prep)
    try:
        cf = CudaForest(forest, prep)
    except ImportError as e:
        raise BackendUnavailableError(f"the cuda backend needs numba's CUDA target: {e}") from e
    return CudaScorer(cf, prep, explain_fn=numba_explainer(forest, prep))
