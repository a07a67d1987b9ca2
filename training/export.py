"""Write fitted detectors as artifacts (arrays + JSON, never pickle).

``export_sklearn(forest, path)`` turns a fitted ``sklearn.ensemble.IsolationForest`` into an
artifact whose scores equal ``-forest.score_samples(X)``; ``export_detector`` writes any detector
from its arrays. Both store a probe set whose expected scores are the training-time scores.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from collections.abc import Mapping

import numpy as np

from outlierd.core.artifact import write_artifact
from outlierd.core.errors import ArtifactError, InvalidInputError
from outlierd.core.iforest import Forest, build_forest
from outlierd.core.model import build_model
from outlierd.core.preprocess import Preprocessing

from .lineage import base_lineage
from .profile import build_reference

PROBE_ROWS = 64
PROBE_TOLERANCE = {"atol": 1e-9, "rtol": 1e-9}


def _probe_rows(X: np.ndarray | None, n_features: int, lo: np.ndarray, hi: np.ndarray, seed: int) -> np.ndarray:
    """Probe records: training rows when there are some, else uniform draws in [lo, hi]; a few
    with NaN so the missing-value path is verified too."""
    rng = np.random.default_rng(seed)
    if X is not None and X.shape[0] > 0:
        rows = np.array(X[rng.choice(X.shape[0], size=min(PROBE_ROWS, X.shape[0]), replace=False)], dtype=np.float64)
    else:
        rows = rng.uniform(lo, hi, size=(PROBE_ROWS, n_features))
    extra = rows[: min(4, rows.shape[0])].copy()
    extra[np.arange(extra.shape[0]), rng.integers(0, n_features, size=extra.shape[0])] = np.nan
    return np.vstack([rows, extra])


def _feature_names(names: list[str] | None, n_features: int, fitted: Any = None) -> list[str]:
    if names is None and fitted is not None and hasattr(fitted, "feature_names_in_"):
        names = [str(n) for n in fitted.feature_names_in_]
    if names is None:
        names = [f"x{i}" for i in range(n_features)]
    names = [str(n) for n in names]
    if len(names) != n_features:
        raise InvalidInputError(f"feature_names has {len(names)} names; the model has {n_features} features")
    if len(set(names)) != len(names):
        raise InvalidInputError("feature_names must be unique")
    return names


def export_detector(
    path: str | os.PathLike,
    *,
    detector: Mapping[str, Any],
    arrays: Mapping[str, np.ndarray],
    prep: Preprocessing,
    feature_names: list[str],
    threshold: float,
    X_train: np.ndarray | None = None,
    train_scores: np.ndarray | None = None,
    probe_source: np.ndarray | None = None,
    lineage: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
    expected_scorer: Any = None,
    seed: int = 0,
    extra_files: Mapping[str, bytes] | None = None,
) -> Path:
    """Write an artifact for any detector.

    ``X_train`` (raw training records) gives the drift reference profile and, unless
    ``probe_source`` is given, the probe records. ``expected_scorer(X_preprocessed)`` gives the
    reference scores for the probe set; by default the kernel itself scores it (the training-time
    scores), and when given, the kernel must agree with it or nothing is written.
    """
    d = len(feature_names)
    all_arrays = {**prep.arrays(), **arrays}
    manifest = {"detector": dict(detector), "features": [{"name": n} for n in feature_names],
                "threshold": float(threshold), "preprocessing": prep.manifest()}
    model = build_model(manifest, all_arrays, files=dict(extra_files or {}))
    source = probe_source if probe_source is not None else X_train
    probe = _probe_rows(source, d, prep.median - 1.0, prep.median + 1.0, seed)
    if prep.reject:
        probe = probe[np.all(np.isfinite(probe), axis=1)]
    if expected_scorer is not None:
        expected = np.asarray(expected_scorer(prep.transform(probe)), dtype=np.float64)
        got = model.score(probe)
        if not np.allclose(got, expected, rtol=PROBE_TOLERANCE["rtol"], atol=PROBE_TOLERANCE["atol"]):
            worst = float(np.max(np.abs(got - expected)))
            raise ArtifactError(f"the exported kernel differs from the reference scorer by {worst:g} on the probe set")
    else:
        expected = model.score(probe)
    reference: dict[str, Any] = {}
    if X_train is not None:
        scores = model.score(X_train) if train_scores is None else train_scores
        reference = build_reference(X_train, scores, feature_names)
    return write_artifact(
        path,
        detector=detector,
        feature_names=feature_names,
        preprocessing=prep.manifest(),
        threshold=threshold,
        arrays=all_arrays,
        probe_X=probe,
        probe_expected=expected,
        probe_tolerance=PROBE_TOLERANCE,
        reference=reference,
        lineage=lineage,
        metrics=metrics,
        extra_files=extra_files,
    )


def forest_from_sklearn(forest: Any) -> Forest:
    """The complete-tree layout of a fitted ``IsolationForest``."""
    if not (hasattr(forest, "estimators_") and hasattr(forest, "estimators_features_")):
        raise InvalidInputError("export_sklearn needs a fitted sklearn.ensemble.IsolationForest")
    trees = []
    for est, feats in zip(forest.estimators_, forest.estimators_features_):
        t = est.tree_
        internal = t.children_left >= 0
        trees.append({
            "children_left": t.children_left,
            "children_right": t.children_right,
            # trees fitted on a feature subsample index into it: map back to the model's features
            "feature": np.where(internal, np.asarray(feats)[np.maximum(t.feature, 0)], 0),
            "threshold": t.threshold,
            "n_node_samples": t.n_node_samples,
        })
    return build_forest(trees, int(forest._max_samples), int(forest.n_features_in_))


def _threshold_span(layout: Forest, d: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per feature: min, max and median of its split thresholds (0, 0, 0 where never split)."""
    lo, hi, mid = np.zeros(d), np.zeros(d), np.zeros(d)
    for j in range(d):
        t = layout.threshold[(layout.feature == j) & np.isfinite(layout.threshold)].astype(np.float64)
        if t.size:
            lo[j], hi[j], mid[j] = t.min(), t.max(), np.median(t)
    return lo, hi, mid


def export_sklearn(
    forest: Any,
    path: str | os.PathLike,
    feature_names: list[str] | None = None,
    threshold: float | None = None,
    *,
    X_train: np.ndarray | None = None,
    missing: str = "impute",
    lineage: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
) -> Path:
    """Export a fitted ``sklearn.ensemble.IsolationForest`` as an artifact directory at ``path``.

    Scores of the loaded model equal ``-forest.score_samples(X)`` (higher = more anomalous).
    ``threshold`` defaults to sklearn's own cut, ``-forest.offset_``. ``X_train`` (optional, the
    data the forest was fitted on) supplies the imputation medians, the probe records and the drift
    reference profile; without it, NaN is imputed with the median of each feature's split
    thresholds, probe records are drawn across the thresholds' range, and the artifact carries no
    reference profile. Returns the artifact path.
    """
    layout = forest_from_sklearn(forest)
    d = int(forest.n_features_in_)
    names = _feature_names(feature_names, d, forest)
    lo, hi, mid = _threshold_span(layout, d)
    probe_source = None
    if X_train is not None:
        X_train = np.asarray(X_train, dtype=np.float64)
        if X_train.ndim != 2 or X_train.shape[1] != d:
            raise InvalidInputError(f"X_train must have shape (n, {d}); got {X_train.shape}")
        with np.errstate(all="ignore"):
            median = np.nanmedian(X_train, axis=0) if X_train.shape[0] else mid
        median = np.where(np.isfinite(median), median, mid)
    else:
        median = mid
        margin = 0.1 * (hi - lo) + 1e-3
        probe_source = np.random.default_rng(0).uniform(lo - margin, hi + margin, size=(PROBE_ROWS, d))
    prep = Preprocessing.identity(d, median=median, missing=missing)
    if threshold is None:
        threshold = -float(forest.offset_)
    params = {k: (v if isinstance(v, (int, float, str, bool, type(None))) else repr(v)) for k, v in forest.get_params().items()}
    detector = {"kind": "iforest", "params": {**params, "n_trees": layout.n_trees, "depth": layout.depth,
                                              "max_samples": int(forest._max_samples)}}
    return export_detector(
        path,
        detector=detector,
        arrays=layout.arrays(),
        prep=prep,
        feature_names=names,
        threshold=threshold,
        X_train=X_train,
        probe_source=probe_source,
        lineage=base_lineage(source="sklearn.ensemble.IsolationForest", **(lineage or {})),
        metrics=metrics,
        expected_scorer=lambda Xp: -forest.score_samples(Xp),
    )
