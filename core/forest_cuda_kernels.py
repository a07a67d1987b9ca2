# mypy: ignore-errors
# (kernel bodies call numba.cuda device intrinsics, whose annotations describe host-side calls)
"""The CUDA kernels of :mod:`core.forest_cuda` (imported on first use: it imports ``numba.cuda``).

Their own module because Numba's CUDA simulator swaps the module-global name ``cuda`` for its
fake when a kernel runs: the kernels must reach ``cuda`` as a global, not as a local import.
"""

from __future__ import annotations

import math
from typing import Any

from numba import cuda, float32, float64

from .preprocess import FLOAT32_MAX

_KERNELS: dict[int, tuple[Any, Any, Any]] = {}


def kernels(ilp: int) -> tuple[Any, Any, Any]:
    """``(score_smem, prep_global, walk_global)`` for ``ilp`` trees per step (compiled lazily, per
    argument types, on first launch)."""
    if ilp not in _KERNELS:
        _KERNELS[ilp] = _make_kernels(ilp)
    return _KERNELS[ilp]


def _make_kernels(ilp: int) -> tuple[Any, Any, Any]:
    if ilp not in (1, 2, 4):
        raise ValueError(f"ilp must be 1, 2 or 4; got {ilp}")
    f32max = FLOAT32_MAX

    @cuda.jit(device=True, inline=True)
    def prep_value(v, j, median, center, scale_inv):
        """One raw value -> the CPU kernel's float32 (the caller handled ``reject``)."""
        if math.isnan(v):
            v = median[j]
        elif math.isinf(v):
            v = f32max if v > 0 else -f32max
        return float32((v - center[j]) * scale_inv[j])

    @cuda.jit(device=True, inline=True)
    def walk(xs, base, feature, threshold, leaf_value, depth):
        """Sum over trees (in tree order) of the leaf values record ``xs[base:]`` reaches."""
        n_trees = feature.shape[0]
        n_int = feature.shape[1]
        acc = 0.0
        t = 0
        if ilp == 4:
            while t + 4 <= n_trees:
                i0 = 0
                i1 = 0
                i2 = 0
                i3 = 0
                for _ in range(depth):
                    a0 = 2 * i0 + 1 + (1 if xs[base + int(feature[t, i0])] > threshold[t, i0] else 0)
                    a1 = 2 * i1 + 1 + (1 if xs[base + int(feature[t + 1, i1])] > threshold[t + 1, i1] else 0)
                    a2 = 2 * i2 + 1 + (1 if xs[base + int(feature[t + 2, i2])] > threshold[t + 2, i2] else 0)
                    a3 = 2 * i3 + 1 + (1 if xs[base + int(feature[t + 3, i3])] > threshold[t + 3, i3] else 0)
                    i0 = a0
                    i1 = a1
                    i2 = a2
                    i3 = a3
                acc += leaf_value[t, i0 - n_int]
                acc += leaf_value[t + 1, i1 - n_int]
                acc += leaf_value[t + 2, i2 - n_int]
                acc += leaf_value[t + 3, i3 - n_int]
                t += 4
        elif ilp == 2:
            while t + 2 <= n_trees:
                i0 = 0
                i1 = 0
                for _ in range(depth):
                    a0 = 2 * i0 + 1 + (1 if xs[base + int(feature[t, i0])] > threshold[t, i0] else 0)
                    a1 = 2 * i1 + 1 + (1 if xs[base + int(feature[t + 1, i1])] > threshold[t + 1, i1] else 0)
                    i0 = a0
                    i1 = a1
                acc += leaf_value[t, i0 - n_int]
                acc += leaf_value[t + 1, i1 - n_int]
                t += 2
        while t < n_trees:
            i = 0
            for _ in range(depth):
                i = 2 * i + 1 + (1 if xs[base + int(feature[t, i])] > threshold[t, i] else 0)
            acc += leaf_value[t, i - n_int]
            t += 1
        return acc

    @cuda.jit(device=True, inline=True)
    def finish(acc, denominator):
        if denominator != 0:
            return 2.0 ** (-acc / denominator)
        return 1.0

    @cuda.jit
    def score_smem(X, n, median, center, scale_inv, reject, feature, threshold, leaf_value, depth, denominator, out, bad):
        """Fused: preprocess the block's rows into shared memory, then one thread per record walks."""
        sm = cuda.shared.array(0, dtype=float32)
        d = X.shape[1]
        stride = d + 1
        tid = cuda.threadIdx.x
        bs = cuda.blockDim.x
        r0 = cuda.blockIdx.x * bs
        m = min(bs, n - r0)
        for k in range(tid, m * d, bs):
            r = k // d
            j = k - r * d
            v = float64(X[r0 + r, j])
            if reject and not math.isfinite(v):
                cuda.atomic.min(bad, 0, r0 + r)
                v = 0.0
            sm[r * stride + j] = prep_value(v, j, median, center, scale_inv)
        cuda.syncthreads()
        if tid < m:
            out[r0 + tid] = finish(walk(sm, tid * stride, feature, threshold, leaf_value, depth), denominator)

    @cuda.jit
    def prep_global(X, n, median, center, scale_inv, reject, Xp, bad):
        """Many features: preprocess into a float32 device buffer (one thread per value)."""
        d = X.shape[1]
        k = cuda.grid(1)
        if k < n * d:
            r = k // d
            j = k - r * d
            v = float64(X[r, j])
            if reject and not math.isfinite(v):
                cuda.atomic.min(bad, 0, r)
                v = 0.0
            Xp[k] = prep_value(v, j, median, center, scale_inv)

    @cuda.jit
    def walk_global(Xp, n, d, feature, threshold, leaf_value, depth, denominator, out):
        r = cuda.grid(1)
        if r < n:
            out[r] = finish(walk(Xp, r * d, feature, threshold, leaf_value, depth), denominator)

    return score_smem, prep_global, walk_global


