"""Autoencoder detector, scored by ONNX Runtime (its native backend: no Numba kernel).

The artifact's ``model.onnx`` (written by ``training.autoencoder``) maps float32 standardized
records ``x`` (n, d) to ``score`` (n,), the mean squared reconstruction error over features
(higher = more anomalous), and ``squared_error`` (n, d), the per-feature squared errors. The
standardization (median imputation, then ``(x - mean) / std``) is the artifact's Preprocessing,
applied by :class:`~core.backends.ArrayScorer` before the graph runs.

Explanations: feature ``j`` contributes its squared reconstruction error (the graph's
``squared_error`` output; their mean is the score). With ``flagged_only`` the graph computes
``squared_error`` only for the flagged records.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .backends import ArrayScorer, DeviceError, register
from .errors import ArtifactError, BackendUnavailableError
from .explain import top_k_of

MODEL_FILE = "model.onnx"
INPUT_NAME = "x"
OUTPUT_NAMES = ("score", "squared_error")
INPUT_CLIP = 1e6      # standardized inputs are clamped to +/- this inside the graph
CHUNK_ROWS = 65536


def session(model_bytes: bytes, device: str):
    """An ONNX Runtime session: CUDA first when ``device == "cuda"``, else the CPU provider."""
    import onnxruntime as ort

    if device == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise DeviceError("--device cuda: onnxruntime here has no CUDAExecutionProvider "
                              "(install the 'gpu' extra, onnxruntime-gpu, on a GPU machine), or use --device cpu")
        # full float32 GEMMs (no TF32), so that the GPU reproduces the CPU's probe scores
        providers = [("CUDAExecutionProvider", {"use_tf32": "0"}), "CPUExecutionProvider"]
    else:
        providers = ["CPUExecutionProvider"]
    try:
        sess = ort.InferenceSession(model_bytes, providers=providers)
    except Exception as e:  # onnxruntime raises its own exception types for a malformed graph
        raise ArtifactError(f"{MODEL_FILE} could not be loaded by onnxruntime: {e}") from e
    if device == "cuda" and "CUDAExecutionProvider" not in sess.get_providers():
        raise DeviceError("--device cuda: onnxruntime could not start its CUDA provider (see its log); use --device cpu")
    return sess


def make_scorer_fn(model_bytes: bytes, n_features: int, device: str = "cpu", chunk_rows: int = CHUNK_ROWS) -> GraphScorer:
    """The graph as a scorer function (:class:`GraphScorer`): ``fn(float32 (n, d)) -> float64 (n,)``;
    ``fn.squared_error(X)`` gives the per-feature squared errors (n, d) and ``fn.session`` the session."""
    sess = session(model_bytes, device)
    inputs, outputs = sess.get_inputs(), [o.name for o in sess.get_outputs()]
    if len(inputs) != 1 or inputs[0].name != INPUT_NAME or any(o not in outputs for o in OUTPUT_NAMES):
        raise ArtifactError(f"{MODEL_FILE} must take {INPUT_NAME!r} and give {', '.join(OUTPUT_NAMES)}; "
                            f"it takes {[i.name for i in inputs]} and gives {outputs}")
    shape = inputs[0].shape
    if len(shape) != 2 or shape[1] != n_features:
        raise ArtifactError(f"{MODEL_FILE} takes records of shape {shape}; the manifest declares {n_features} features")

    return GraphScorer(sess, chunk_rows)


class GraphScorer:
    """``fn(float32 (n, d)) -> float64 (n,)`` running the graph, ``chunk_rows`` rows per session run;
    ``fn.squared_error(X)`` gives the per-feature squared errors (n, d), ``fn.session`` the session."""

    def __init__(self, session: Any, chunk_rows: int):
        self.session = session
        self.chunk_rows = chunk_rows

    def _run(self, X: np.ndarray, output: str) -> np.ndarray:
        X = np.ascontiguousarray(X, dtype=np.float32)
        sess, chunk_rows = self.session, self.chunk_rows
        if X.shape[0] <= chunk_rows:
            return sess.run([output], {INPUT_NAME: X})[0]
        return np.concatenate([sess.run([output], {INPUT_NAME: X[lo:lo + chunk_rows]})[0]
                               for lo in range(0, X.shape[0], chunk_rows)])

    def __call__(self, X: np.ndarray) -> np.ndarray:
        return self._run(X, "score").astype(np.float64)

    def squared_error(self, X: np.ndarray) -> np.ndarray:
        return self._run(X, "squared_error").astype(np.float64)


@register("autoencoder", "onnx", native=True)
def _autoencoder_onnx(detector, arrays, d, prep, device, files):
    if MODEL_FILE not in files:
        raise ArtifactError(f"the autoencoder artifact lacks {MODEL_FILE}")
    try:
        import onnxruntime  # noqa: F401
    except ImportError as e:
        raise BackendUnavailableError("the autoencoder is scored by ONNX Runtime: pip install 'outlierd[onnx]'") from e
    fn = make_scorer_fn(files[MODEL_FILE], d, device)

    def explain_fn(X: np.ndarray, top_k: int) -> tuple[np.ndarray, np.ndarray]:
        # X: validated raw records (the scorer already enforced the missing-value policy)
        return top_k_of(fn.squared_error(prep.transform(X).astype(np.float32)), top_k)

    return ArrayScorer(fn, prep, "onnx", device, explain_fn=explain_fn)
