"""Loaded models: ``load_model(path)`` -> :class:`Model` with ``score`` / ``predict``.

Loading is all-or-nothing: the manifest digest, every file's sha256, the arrays' shapes and the
probe scores are checked before a ``Model`` exists. A model that does not reproduce its
training-time probe scores is refused (:class:`~core.errors.ArtifactError`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from . import hbos, hst, iforest, robust_z, rshash
from .artifact import ARRAYS, PROBE, REFERENCE, load_json, load_npz, read_manifest, verify_files
from .backends import BACKENDS, BUILDERS, NATIVE_BACKEND, SERIAL_MAX_ROWS, NumbaScorer, register, resolve_device
from .errors import ArtifactError, InvalidInputError, UnsupportedError
from .explain import check_top_k
from .preprocess import Preprocessing
from .streaming import StreamingScorer

_FLOAT_KINDS = "fiub"



class Model:
    """A verified, immutable, ready-to-score model.

    Scores are float64, **higher = more anomalous**; ``predict`` flags ``score >= threshold``.
    """

    def __init__(self, path: Path | None, manifest: dict[str, Any], prep: Preprocessing, scorer: Any, reference: dict[str, Any]):
        self.path = path
        self.manifest = manifest
        self.kind: str = manifest["detector"]["kind"]
        self.feature_names: list[str] = [f["name"] for f in manifest["features"]]
        self.n_features: int = len(self.feature_names)
        self.threshold: float = float(manifest["threshold"])
        self.name: str | None = manifest.get("model")
        self.version: int | None = manifest.get("version")
        self.metrics: dict[str, Any] = manifest.get("metrics", {})
        self.reference = reference
        self.preprocessing = prep
        self._scorer = scorer
        self.backend: str = scorer.backend
        self.device: str = scorer.device

    def __repr__(self) -> str:
        return (f"Model(kind={self.kind!r}, name={self.name!r}, version={self.version}, n_features={self.n_features}, "
                f"backend={self.backend!r}, device={self.device!r})")

    def _check(self, X: Any) -> np.ndarray:
        if not (isinstance(X, np.ndarray) and X.dtype.kind == "f" and X.dtype.itemsize in (4, 8)):
            try:
                X = np.asarray(X)
            except (ValueError, TypeError) as e:
                raise InvalidInputError(f"X must be a numeric 2-D array (n_records, {self.n_features}): {e}") from e
            if X.dtype.kind not in _FLOAT_KINDS:
                raise InvalidInputError(
                    f"X must be numeric (float32 or float64) of shape (n_records, {self.n_features}); got dtype {X.dtype}"
                )
            X = X.astype(np.float64)
        if X.ndim != 2:
            raise InvalidInputError(f"X must be 2-D (n_records, {self.n_features}); got shape {X.shape}")
        if X.shape[1] != self.n_features:
            raise InvalidInputError(
                f"X has {X.shape[1]} features per record; this model expects {self.n_features} "
                f"({', '.join(self.feature_names[:5])}{', …' if self.n_features > 5 else ''})"
            )
        if not X.flags.c_contiguous:
            X = np.ascontiguousarray(X)
        return X

    def score(self, X: Any, *, parallel: bool | None = None) -> np.ndarray:
        """Score records ``X`` of shape ``(n, n_features)`` (float32 or float64; other numeric types
        are converted). Returns ``(n,)`` float64, higher = more anomalous. NaN / inf follow the
        artifact's missing-value policy and never produce NaN scores; under ``reject`` they raise
        :class:`~core.errors.InvalidInputError` naming the row.

        ``parallel``: use every core (True), one (False), or decide by batch size (None). A server
        that already scores several batches at once wants False.
        """
        return self._scorer(self._check(X), parallel)

    def predict(self, X: Any) -> np.ndarray:
        """``(n,)`` bool: ``score(X) >= threshold``."""
        return self.score(X) >= self.threshold

    def explain(self, X: Any, top_k: int = 3, *, parallel: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Per-record feature attributions of ``X`` (same input rules and preprocessing as
        :meth:`score`): ``(features, contributions)``, two ``(n, top_k)`` arrays, int64 feature
        indices (most contributing first; ties: lower index first) and float64 contributions
        (higher = pushes the record towards anomalous; their meaning per detector is in
        :mod:`core.explain`). ``top_k`` must be in ``[1, n_features]``."""
        _, feat, contrib = self.score_explain(X, top_k, parallel=parallel)
        return feat, contrib

    @property
    def streaming(self) -> bool:
        """True for a detector that learns as it scores (Half-Space Trees, ...): see ``score_update``."""
        return isinstance(self._scorer, StreamingScorer)

    @property
    def stream(self) -> StreamingScorer:
        """The streaming detector's scorer (its state, ``snapshot`` / ``restore``); UnsupportedError otherwise."""
        if not isinstance(self._scorer, StreamingScorer):
            raise UnsupportedError(f"detector {self.kind!r} does not learn while it scores")
        return self._scorer

    def score_update(self, X: Any, *, parallel: bool | None = None) -> np.ndarray:
        """Prequential scoring for a streaming detector: each record of ``X`` is scored against the
        state before it (higher = more anomalous), then learned. Same input rules as :meth:`score`."""
        return self.stream.score_update(self._check(X), parallel)

    def update(self, X: Any, *, parallel: bool | None = None) -> None:
        """Learn ``X`` (in order) without scoring it; streaming detectors only."""
        self.stream.update(self._check(X), parallel)

    def score_explain(self, X: Any, top_k: int = 3, flagged_only: bool = False, *, threshold: float | None = None,
                      parallel: bool | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Scores and explanations in one pass over ``X``: ``(scores, features, contributions)``;
        ``scores`` is exactly :meth:`score`'s. With ``flagged_only`` only records with
        ``score >= threshold`` are explained (inside the kernel, while their block is in cache);
        the others get feature -1 and contribution NaN, which keeps throughput near plain scoring
        at low alert rates. ``threshold``: the cut for ``flagged_only`` when it is not the model's
        own (e.g. a server's threshold in force); default ``self.threshold``."""
        X = self._check(X)
        top_k = check_top_k(top_k, self.n_features)
        cut = self.threshold if threshold is None else float(threshold)
        return self._scorer.explain(X, top_k, cut, bool(flagged_only), parallel)


@register("iforest", "numba")
def _iforest_numba(detector, arrays, d, prep, device, files):
    return iforest.numba_scorer(iforest.Forest.from_arrays(arrays, d), prep)


@register("robust_z", "numba")
def _robust_z_numba(detector, arrays, d, prep, device, files):
    rz = robust_z.RobustZ.from_arrays(arrays, d, detector.get("params", {}).get("combine", "rms"))
    return NumbaScorer(robust_z.score_serial, robust_z.score_parallel, prep, (rz.median, rz.scale_inv, rz.combine == "max"),
                       explain=(robust_z.explain_serial, robust_z.explain_parallel, ()))


@register("hbos", "numba")
def _hbos_numba(detector, arrays, d, prep, device, files):
    h = hbos.Hbos.from_arrays(arrays, d)
    return NumbaScorer(hbos.score_serial, hbos.score_parallel, prep, (h.lo, h.hi, h.inv_width, h.table),
                       explain=(hbos.explain_serial, hbos.explain_parallel, ()))


@register("hst", "numba")
def _hst_numba(detector, arrays, d, prep, device, files):
    params = detector.get("params", {})

    def rebuild(a: dict[str, np.ndarray]) -> hst.HalfSpaceTrees:
        return hst.HalfSpaceTrees.from_arrays(a, d, params)

    return StreamingScorer(rebuild(arrays), prep, rebuild)


@register("rshash", "numba")
def _rshash_numba(detector, arrays, d, prep, device, files):
    params = detector.get("params", {})

    def rebuild(a: dict[str, np.ndarray]) -> rshash.RSHash:
        return rshash.RSHash.from_arrays(a, d, params)

    return StreamingScorer(rebuild(arrays), prep, rebuild)


def _load_plugins() -> None:
    # detectors and backends that register themselves on import (optional dependencies inside)
    import importlib

    for mod in PLUGINS:
        try:
            importlib.import_module(mod)
        except ImportError:
            pass


PLUGINS: tuple[str, ...] = ("outlierd.core.forest_onnx", "outlierd.core.forest_torch", "outlierd.core.forest_cuda", "outlierd.core.knn", "outlierd.core.autoencoder", "outlierd.core.stacked")


def build_model(manifest: dict[str, Any], arrays: dict[str, np.ndarray], reference: dict[str, Any] | None = None,
                path: Path | None = None, *, backend: str = "numba", device: str = "auto",
                files: dict[str, bytes] | None = None) -> Model:
    """Assemble a :class:`Model` from a manifest and its arrays (no file checks, no probe).
    ``files`` holds extra artifact files by name (e.g. ``model.onnx``); read from ``path`` if absent."""
    try:
        detector = manifest["detector"]
        kind = detector["kind"]
        d = len(manifest["features"])
        threshold = float(manifest["threshold"])
    except (KeyError, TypeError, ValueError) as e:
        raise ArtifactError(f"manifest lacks a required field: {e}") from e
    if d < 1 or not np.isfinite(threshold):
        raise ArtifactError(f"manifest declares {d} features and threshold {threshold}")
    if backend not in BACKENDS:
        raise InvalidInputError(f"backend must be one of {BACKENDS}; got {backend!r}")
    _load_plugins()
    if (kind, backend) not in BUILDERS and backend == "numba" and kind in NATIVE_BACKEND:
        backend = NATIVE_BACKEND[kind]  # e.g. the autoencoder has no Numba kernel: ONNX is its default
    if (kind, backend) not in BUILDERS:
        kinds = sorted({k for k, _ in BUILDERS})
        if kind not in kinds:
            raise ArtifactError(f"unknown detector kind {kind!r}; this outlierd knows {', '.join(kinds)}")
        have = sorted(b for k, b in BUILDERS if k == kind)
        raise InvalidInputError(f"detector {kind!r} has no {backend!r} backend; available: {', '.join(have)}")
    prep = Preprocessing.from_artifact(manifest.get("preprocessing", {}), arrays, d)
    if files is None:
        files = {}
        if path is not None:
            for name in manifest.get("files", {}):
                if name not in (ARRAYS, PROBE, REFERENCE):
                    files[name] = (path / name).read_bytes()
    scorer = BUILDERS[(kind, backend)](detector, arrays, d, prep, resolve_device(device, backend), files)
    return Model(path, manifest, prep, scorer, reference or {})


def load_model(path: str | os.PathLike, *, backend: str = "numba", device: str = "auto", verify_probe: bool = True) -> Model:
    """Load and verify the artifact directory ``path``.

    ``backend``: "numba" (CPU kernels, the default), "onnx" (ONNX Runtime) or "torch"; ``device``:
    "cpu", "cuda" or "auto" (CUDA when the backend can use a present GPU). ``model.backend`` and
    ``model.device`` say what was chosen. Raises :class:`~core.errors.ArtifactError` when the
    artifact is missing, corrupt, edited, of a newer format, or does not reproduce its probe scores,
    and :class:`~core.backends.DeviceError` for ``device="cuda"`` without a usable GPU.
    """
    root = Path(path)
    if not root.is_dir():
        raise ArtifactError(f"{root} is not a model artifact directory")
    manifest = read_manifest(root)
    verify_files(root, manifest)
    reference = load_json(root / REFERENCE)
    model = build_model(manifest, load_npz(root / ARRAYS), reference, root, backend=backend, device=device)
    if verify_probe:
        _verify_probe(model, root, manifest)
    return model


def _verify_probe(model: Model, root: Path, manifest: dict[str, Any]) -> None:
    probe = load_npz(root / PROBE)
    try:
        X, expected = probe["X"], probe["expected"]
    except KeyError as e:
        raise ArtifactError(f"{root / PROBE} lacks {e}") from e
    spec = manifest.get("probe", {})
    atol, rtol = float(spec.get("atol", 1e-6)), float(spec.get("rtol", 1e-9))
    if X.ndim != 2 or X.shape[1] != model.n_features or expected.shape != (X.shape[0],):
        raise ArtifactError(f"{root / PROBE} does not match the model's {model.n_features} features")
    if X.shape[0] == 0:
        raise ArtifactError(f"{root / PROBE} is empty: the model cannot prove it reproduces its scores")
    try:
        # Probe both paths: the serial kernel and the parallel one serve different batch sizes.
        got = model.score(X)
        reps = -(-(SERIAL_MAX_ROWS + 1) // X.shape[0])
        got_parallel = model.score(np.tile(X, (reps, 1)))[: X.shape[0]]
    except InvalidInputError as e:
        raise ArtifactError(f"{root}: probe records could not be scored: {e}") from e
    for name, scores in (("serial", got), ("parallel", got_parallel)):
        err = np.abs(scores - expected)
        worst = int(np.argmax(err - (atol + rtol * np.abs(expected))))
        if not np.all(err <= atol + rtol * np.abs(expected)):
            raise ArtifactError(
                f"{root}: probe record {worst} scores {scores[worst]!r} on the {name} kernel, expected "
                f"{expected[worst]!r} (atol {atol}, rtol {rtol}); the artifact does not reproduce its "
                "training-time scores and is refused"
            )
