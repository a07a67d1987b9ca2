"""Isolation Forest as a torch program (CPU or CUDA): the same tensorised walk as the ONNX graph.

Per (row, tree) the walk tracks ``pos``, the current node's index into the trees' flattened node
arrays (``pos = t * (2**D - 1) + i``); a level gathers the split feature and threshold at ``pos``,
the record's value at that feature, and steps to child ``2i+1 + (x > thr)``. Leaf path lengths
are summed in float64 and ``2 ** (-sum / denominator)`` is computed in float64 (NumPy, on the
host), so scores match the Numba kernel to ~1e-15. torch is imported only when the backend is
built: ``core`` imports without it.

Explanations: scores from torch, attributions from the Numba explanation kernel
(:mod:`core.iforest`) on the same forest arrays, on the CPU (as for the ONNX backend).
"""

from __future__ import annotations

import numpy as np

from .backends import ArrayScorer, import_torch, register
from .iforest import Forest, numba_explainer

CHUNK_ROWS = 65_536  # rows per step: bounds the (n, T) index tensors' memory


class TorchForest:
    """``fn(float32 (n, d)) -> float64 (n,)`` walking the forest with torch on ``device``."""

    def __init__(self, forest: Forest, device: str = "cpu", chunk_rows: int | None = None):
        import torch

        self.torch = torch
        self.device = torch.device("cuda" if device == "cuda" else "cpu")
        self.chunk_rows = chunk_rows or CHUNK_ROWS
        T, n_int = forest.feature.shape
        self.depth = forest.depth
        self.denominator = float(forest.denominator)
        tree = torch.arange(T, dtype=torch.int64)
        dev = self.device
        feature = torch.from_numpy(forest.feature.astype(np.int64))
        self.feature_flat = feature.reshape(-1).to(dev)
        self.threshold_flat = torch.from_numpy(np.ascontiguousarray(forest.threshold, dtype=np.float32)).reshape(-1).to(dev)
        self.leaf_flat = torch.from_numpy(np.ascontiguousarray(forest.leaf_value, dtype=np.float64)).reshape(-1).to(dev)
        self.root_feature = feature[:, 0].contiguous().to(dev)                                   # (T,)
        self.root_threshold = torch.from_numpy(forest.threshold[:, 0].astype(np.float32)).to(dev)  # (T,)
        self.root_child = (tree * n_int + 1).to(dev)   # flat index of each tree's node 1
        self.step = (1 - tree * n_int).to(dev)         # pos -> 2 * pos + step + (x > thr)
        self.leaf_shift = (tree - n_int).to(dev)       # flat node index -> flat leaf index

    def path_sums(self, X):
        """``X``: float32 tensor (n, d) on the device -> float64 (n,) sums of path lengths."""
        torch = self.torch
        x = X.index_select(1, self.root_feature)                       # (n, T)
        pos = self.root_child + (x > self.root_threshold)              # (n, T) int64
        for _ in range(1, self.depth):
            f = self.feature_flat.take(pos)
            thr = self.threshold_flat.take(pos)
            x = X.gather(1, f)
            pos = pos * 2 + self.step + (x > thr)
        return self.leaf_flat.take(pos + self.leaf_shift).sum(dim=1, dtype=torch.float64)

    def __call__(self, X: np.ndarray) -> np.ndarray:
        torch = self.torch
        n = X.shape[0]
        if self.denominator == 0:  # the Numba kernel's convention: no information, score 1
            return np.ones(n, dtype=np.float64)
        sums = np.empty(n, dtype=np.float64)
        with torch.inference_mode():
            for lo in range(0, n, self.chunk_rows):
                hi = min(lo + self.chunk_rows, n)
                chunk = torch.from_numpy(np.ascontiguousarray(X[lo:hi], dtype=np.float32)).to(self.device)
                sums[lo:hi] = self.path_sums(chunk).cpu().numpy()
        return 2.0 ** (-sums / self.denominator)


@register("iforest", "torch")
def _iforest_torch(detector, arrays, d, prep, device, files):
    import_torch(device)
    forest = Forest.from_arrays(arrays, d)
    return ArrayScorer(TorchForest(forest, device), prep, "torch", device, explain_fn=numba_explainer(forest, prep))
