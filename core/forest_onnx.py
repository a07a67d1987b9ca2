"""Isolation Forest as an ONNX graph of standard operators (ONNX Runtime, CPU or CUDA).

No ``ai.onnx.ml`` TreeEnsemble operators: ONNX Runtime's CUDA provider has no kernel for them.
The graph is a tensorised walk of the complete fixed-depth trees of :class:`core.iforest.Forest`,
unrolled over the ``D`` levels (``D`` is known at export). Per (row, tree) it tracks ``pos``, the
current node's index into the trees' *flattened* node arrays (``pos = t * (2**D - 1) + i``), so a
level is::

    f   = Gather(feature_flat, pos)        # (n, T) split feature
    thr = Gather(threshold_flat, pos)      # (n, T) float32 threshold
    x   = GatherElements(X, f, axis=1)     # (n, T) the record's value at that feature
    pos = 2 * pos + (1 - t * (2**D - 1)) + (x > thr)   # child 2i+1 / 2i+2, in flat terms

Level 0 is cheaper: every walk starts at the root, so ``x = Gather(X, root_feature, axis=1)``.
The leaves' path lengths are gathered as float64 and summed in float64, and the score
``2 ** (-sum / denominator)`` is computed in float64, so scores match the Numba kernel to ~1e-15
(only the summation order differs). Input ``X``: float32 ``(n, d)``, dynamic ``n``; output
``score``: float64 ``(n,)``.

Explanations: the graph has no per-split output, so ``Model.explain`` / ``score_explain`` on this
backend take the scores from the graph and the attributions from the Numba explanation kernel
(:mod:`core.iforest`) on the same forest arrays, on the CPU.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .backends import ArrayScorer, DeviceError, register
from .errors import BackendUnavailableError
from .iforest import Forest, numba_explainer

OPSET = 17
CHUNK_ROWS = 65_536  # rows per session run: bounds the (n, T) index tensors' memory


def forest_to_onnx(forest: Forest, n_features: int):
    """The forest as an ``onnx.ModelProto`` (checked with ``onnx.checker``)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    T, n_int = forest.feature.shape
    depth = forest.depth
    # int64 indices: T * 2**D can exceed int32 only for absurd forests, but ORT's GatherElements
    # and Gather take either, and int64 keeps the arithmetic free of overflow questions.
    feature = forest.feature.astype(np.int64)
    tree = np.arange(T, dtype=np.int64)
    inits = [
        numpy_helper.from_array(np.ascontiguousarray(forest.leaf_value, dtype=np.float64).reshape(-1), "leaf_flat"),
        numpy_helper.from_array(feature[:, 0].copy(), "root_feature"),              # (T,)
        numpy_helper.from_array(forest.threshold[:, 0].astype(np.float32), "root_threshold"),  # (T,)
        numpy_helper.from_array(tree * n_int + 1, "root_child"),                    # flat index of child 1
        numpy_helper.from_array(tree - n_int, "leaf_shift"),                        # flat node -> flat leaf
        numpy_helper.from_array(np.array([1], dtype=np.int64), "axis1"),
        numpy_helper.from_array(np.array(2.0, dtype=np.float64), "base"),
        numpy_helper.from_array(np.array(forest.denominator, dtype=np.float64), "denominator"),
    ]
    if depth > 1:  # below the root level
        inits += [
            numpy_helper.from_array(feature.reshape(-1), "feature_flat"),
            numpy_helper.from_array(np.ascontiguousarray(forest.threshold, dtype=np.float32).reshape(-1), "threshold_flat"),
            numpy_helper.from_array(1 - tree * n_int, "step"),                      # (T,)
            numpy_helper.from_array(np.array(2, dtype=np.int64), "two"),
        ]
    nodes = []

    def node(op, inputs, output, **attrs):
        nodes.append(helper.make_node(op, inputs, [output], name=output, **attrs))
        return output

    # level 0: every walk is at its tree's root
    x = node("Gather", ["X", "root_feature"], "x0", axis=1)                         # (n, T)
    gt = node("Cast", [node("Greater", [x, "root_threshold"], "gt0_b")], "gt0", to=TensorProto.INT64)
    pos = node("Add", ["root_child", gt], "pos1")                                   # (n, T)
    for level in range(1, depth):
        f = node("Gather", ["feature_flat", pos], f"f{level}", axis=0)
        thr = node("Gather", ["threshold_flat", pos], f"thr{level}", axis=0)
        x = node("GatherElements", ["X", f], f"x{level}", axis=1)
        gt = node("Cast", [node("Greater", [x, thr], f"gt{level}_b")], f"gt{level}", to=TensorProto.INT64)
        twice = node("Mul", [pos, "two"], f"twice{level}")
        pos = node("Add", [node("Add", [twice, "step"], f"base{level}"), gt], f"pos{level + 1}")
    leaf = node("Add", [pos, "leaf_shift"], "leaf_index")
    values = node("Gather", ["leaf_flat", leaf], "leaf_values", axis=0)             # (n, T) float64
    total = node("ReduceSum", [values, "axis1"], "path_sum", keepdims=0)            # (n,) float64
    neg = node("Neg", [node("Div", [total, "denominator"], "mean_ratio")], "exponent")
    node("Pow", ["base", neg], "score")

    graph = helper.make_graph(
        nodes,
        "outlierd_iforest",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["n", n_features])],
        [helper.make_tensor_value_info("score", TensorProto.DOUBLE, ["n"])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="outlierd")
    model.ir_version = min(model.ir_version, 8)  # IR 8 carries opset 17: older onnxruntime(-gpu) builds load it
    onnx.checker.check_model(model, full_check=True)
    return model


def _session(model_bytes: bytes, device: str):
    import onnxruntime as ort

    if device == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise DeviceError("--device cuda: onnxruntime here has no CUDAExecutionProvider "
                              "(install the 'gpu' extra, onnxruntime-gpu, on a GPU machine), or use --device cpu")
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    else:
        providers = ["CPUExecutionProvider"]
    sess = ort.InferenceSession(model_bytes, providers=providers)
    if device == "cuda" and "CUDAExecutionProvider" not in sess.get_providers():
        raise DeviceError("--device cuda: onnxruntime could not start its CUDA provider (see its log); use --device cpu")
    return sess


class GraphScorer:
    """``fn(float32 (n, d)) -> float64 (n,)`` running the forest's ONNX graph, ``chunk_rows`` rows
    per session run; ``fn.session`` is the ONNX Runtime session."""

    def __init__(self, session: Any, chunk_rows: int, constant: bool):
        self.session = session
        self.chunk_rows = chunk_rows
        self.constant = constant  # the Numba kernel's convention: no information, score 1

    def __call__(self, X: np.ndarray) -> np.ndarray:
        n, chunk_rows = X.shape[0], self.chunk_rows
        if self.constant:
            return np.ones(n, dtype=np.float64)
        if n <= chunk_rows:
            return self.session.run(["score"], {"X": X})[0]
        out = np.empty(n, dtype=np.float64)
        for lo in range(0, n, chunk_rows):
            hi = min(lo + chunk_rows, n)
            out[lo:hi] = self.session.run(["score"], {"X": X[lo:hi]})[0]
        return out


def make_scorer_fn(forest: Forest, n_features: int, device: str = "cpu", chunk_rows: int | None = None) -> GraphScorer:
    """The forest's ONNX graph as a scorer function (:class:`GraphScorer`), ``chunk_rows``
    (default :data:`CHUNK_ROWS`) rows per session run."""
    sess = _session(forest_to_onnx(forest, n_features).SerializeToString(), device)
    return GraphScorer(sess, chunk_rows or CHUNK_ROWS, forest.denominator == 0)


@register("iforest", "onnx")
def _iforest_onnx(detector, arrays, d, prep, device, files):
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as e:
        raise BackendUnavailableError("the onnx backend needs `pip install onnx onnxruntime` (or onnxruntime-gpu for CUDA)") from e
    forest = Forest.from_arrays(arrays, d)
    return ArrayScorer(make_scorer_fn(forest, d, device), prep, "onnx", device, explain_fn=numba_explainer(forest, prep))
