"""The training pipeline behind ``outlierd train``.

data -> validation -> preprocessing fit (median imputation) -> detector fit -> artifact (probe +
reference profile) -> training scores -> threshold calibrated to the alert rate -> evaluation (with
labels) -> lineage -> registry publish (+ alias).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence, TextIO

import numpy as np

from outlierd.core.artifact import rewrite_manifest
from outlierd.core.model import load_model
from outlierd.core.preprocess import Preprocessing
from outlierd.core.registry import Registry

from .data import load_dataset
from .detectors import DETECTORS, fit_hbos, fit_iforest, fit_knn, fit_lof, fit_robust_z
from .evaluate import evaluate, threshold_for_alert_rate
from .export import export_detector, export_sklearn
from .lineage import base_lineage, data_lineage

DEFAULT_ALERT_RATE = 0.01


class Progress:
    """Step lines with elapsed time, on stderr so stdout stays for results."""

    def __init__(self, total: int, stream: TextIO | None = None, quiet: bool = False):
        self.total, self.step, self.quiet = total, 0, quiet
        self.stream = stream or sys.stderr
        self.t0 = time.perf_counter()

    def __call__(self, what: str) -> None:
        self.step += 1
        if not self.quiet:
            print(f"[{self.step}/{self.total}] {what} (+{time.perf_counter() - self.t0:.1f}s)", file=self.stream, flush=True)


@dataclass
class TrainResult:
    version: int
    path: Path
    threshold: float
    metrics: dict[str, Any]
    warnings: list[str]
    rows: int
    n_features: int


def _fit_and_export(detector: str, X: np.ndarray, names: list[str], prep: Preprocessing, seed: int, dest: Path, lineage: dict[str, Any]) -> Path:
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
    else:
        fit: Callable[..., tuple[dict[str, Any], dict[str, np.ndarray]]] = fit_robust_z if detector == "robust_z" else fit_hbos
        spec, arrays = fit(Xp)
    return export_detector(dest, detector=spec, arrays=arrays, prep=prep, feature_names=names, threshold=0.0,
                           X_train=X, lineage=base_lineage(**lineage), seed=seed)


def train(
    data: str | os.PathLike,
    registry: str | os.PathLike,
    model: str,
    *,
    detector: str = "iforest",
    label_column: str | None = None,
    alert_rate: float = DEFAULT_ALERT_RATE,
    alias: str | None = None,
    seed: int = 0,
    quiet: bool = False,
    select: str | Sequence[str] | None = None,
    labels_from_feedback: bool = False,
    feedback_store: str | os.PathLike | None = None,
    min_labels: int = 5,
    folds: int = 5,
) -> TrainResult:
    """Train ``detector`` on ``data`` and publish it to ``registry`` as ``model``; returns the
    published version with its threshold and metrics.

    Labels: a ``label_column`` with every row labelled (0/1) is used for evaluation only, as
    before. Partial labels (empty cells), ``labels_from_feedback``, ``select`` or ``detector``
    "auto" / "stacked" take the label-aware path (training/semi.py): known anomalies are left out
    of the fit, detectors are compared out of fold, a semi-supervised model is fitted when there
    are ``min_labels`` labels of each kind."""
    from . import semi

    if semi.uses_labels(detector, select, labels_from_feedback) or (
            label_column is not None and bool(np.any(semi.read_label_column(data, label_column) < 0))):
        return semi.train_with_labels(
            data, registry, model, detector=detector, label_column=label_column, select=select,
            labels_from_feedback=labels_from_feedback, feedback_store=feedback_store, min_labels=min_labels,
            folds=folds, alert_rate=alert_rate, alias=alias, seed=seed, quiet=quiet)
    if detector not in DETECTORS:
        raise ValueError(f"unknown detector {detector!r}; choose one of {', '.join(DETECTORS)}")
    if not 0.0 < alert_rate < 1.0:
        raise ValueError(f"--alert-rate must be in (0, 1); got {alert_rate}")
    reg = Registry(registry)
    progress = Progress(6, quiet=quiet)
    progress(f"loading {data}")
    ds = load_dataset(data, label_column=label_column)
    for w in ds.warnings:
        print(f"warning: {w}", file=sys.stderr)
    progress(f"fitting {detector} on {ds.n_rows} rows x {len(ds.feature_names)} features")
    with np.errstate(all="ignore"):
        median = np.nanmedian(np.where(np.isfinite(ds.X), ds.X, np.nan), axis=0)
    prep = Preprocessing.identity(len(ds.feature_names), median=median)
    lineage = {
        "data": data_lineage(data, ds.n_rows, ds.feature_names),
        "parameters": {"detector": detector, "seed": seed, "alert_rate": alert_rate, "label_column": label_column},
    }
    workdir = Path(tempfile.mkdtemp(prefix="outlierd-train-"))
    try:
        path = _fit_and_export(detector, ds.X, ds.feature_names, prep, seed, workdir / "artifact", lineage)
        progress("verifying the artifact and scoring the training data")
        scores = load_model(path).score(ds.X)
        threshold = threshold_for_alert_rate(scores, alert_rate)
        metrics: dict[str, Any] = {"alert_rate": alert_rate, "train_alert_rate": float(np.mean(scores >= threshold))}
        progress("evaluating" + ("" if ds.labels is not None else " (no labels: metrics skipped)"))
        if ds.labels is not None:
            metrics.update(evaluate(scores, ds.labels, threshold))
        rewrite_manifest(path, threshold=threshold, metrics=metrics)
        load_model(path)  # the final artifact must load before it is published
        progress(f"publishing to {registry}")
        version = reg.publish(model, path, aliases=(alias,) if alias else ())
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    progress(f"published {model} version {version}" + (f" as {alias!r}" if alias else ""))
    return TrainResult(version, reg.path(model, version), threshold, metrics, ds.warnings, ds.n_rows, len(ds.feature_names))
