"""Fit one detector on training rows and write its artifact: the fit/export stage shared by the
unsupervised and the label-aware paths of the training pipeline."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from collections.abc import Callable

import numpy as np

from outlierd.core.preprocess import Preprocessing

from .detectors import fit_hbos, fit_hst, fit_iforest, fit_knn, fit_lof, fit_robust_z, fit_rshash
from .export import export_detector, export_sklearn
from .lineage import base_lineage


def fit_and_export(detector: str, X: np.ndarray, names: list[str], prep: Preprocessing, seed: int, dest: Path,
                   lineage: dict[str, Any]) -> Path:
    """Fit ``detector`` on the raw rows ``X`` (after ``prep``) and write its artifact to ``dest``."""
    Xp = prep.transform(X)
    if detector == "iforest":
        forest = fit_iforest(Xp, seed=seed)
        return export_sklearn(forest, dest, names, X_train=X, lineage=lineage)
    if detector == "autoencoder":
        from .autoencoder import export_autoencoder, fit_autoencoder, standardizing_prep

        prep = standardizing_prep(X, prep.median, prep.missing)
        ae = fit_autoencoder(prep.transform(X), seed=seed)
        return export_autoencoder(dest, ae, prep, names, X_train=X, lineage=base_lineage(**lineage), seed=seed)
    if detector in ("knn", "lof"):
        spec, arrays = (fit_knn if detector == "knn" else fit_lof)(Xp, seed=seed)
    elif detector == "hst":
        spec, arrays = fit_hst(Xp, seed=seed)
    elif detector == "rshash":
        spec, arrays = fit_rshash(Xp, seed=seed)
    else:
        fit: Callable[..., tuple[dict[str, Any], dict[str, np.ndarray]]] = fit_robust_z if detector == "robust_z" else fit_hbos
        spec, arrays = fit(Xp)
    return export_detector(dest, detector=spec, arrays=arrays, prep=prep, feature_names=names, threshold=0.0,
                           X_train=X, lineage=base_lineage(**lineage), seed=seed)
