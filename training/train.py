"""The training pipeline behind ``outlierd train``: one path, in stages over small frozen records.

load (the data file is read once; labels, if any, come from the same table) -> plan (which detector;
with labels, chosen out of fold) -> fit/export (preprocessing fit, detector fit, artifact with probe
and reference profile) -> calibrate (the artifact is loaded and its probe verified once, the
training rows scored, the threshold set to the alert rate) -> evaluate (with labels) -> publish
(registry, alias; the probe is not replayed a third time).

Without labels, or with a fully labelled column (evaluation only), every row is fitted. With
labels used for training (partial labels, feedback records, ``select``, ``auto`` / ``stacked``:
see :class:`~outlierd.training.spec.TrainSpec`) the known anomalies are left out of the fit and the
metrics come from out-of-fold scores (``training.semi``).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TextIO
from collections.abc import Callable

import numpy as np
import pyarrow as pa

from outlierd.core.artifact import rewrite_manifest
from outlierd.core.errors import DataError
from outlierd.core.model import load_model
from outlierd.core.preprocess import Preprocessing
from outlierd.core.registry import Registry
from outlierd.core.stacked import KIND as STACKED

from .data import check_no_label_like, dataset_from_table, read_table
from .detectors import check_fit_rows
from .evaluate import evaluate, threshold_for_alert_rate
from .fit import fit_and_export
from .labels import LabelledData, LabelledRecords, labelled_data, parse_labels
from .lineage import data_lineage
from .semi import MIN_SELECT_LABELS, Plan, export_candidate, export_stacked, plan
from .spec import AUTO, DEFAULT_ALERT_RATE, DEFAULT_DETECTOR, TrainSpec

__all__ = ["DEFAULT_ALERT_RATE", "LabelledRecords", "Progress", "TrainResult", "TrainSpec", "run_train", "train"]


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


@dataclass(frozen=True, eq=False)
class Loaded:
    """Stage 1: the rows to train on, their labels and what the labels are for."""

    X: np.ndarray                        # (n, d) float64, NaN where missing
    feature_names: list[str]
    warnings: list[str]
    n_file_rows: int
    eval_labels: np.ndarray | None = None  # a fully labelled column: in-sample evaluation only
    labelled: LabelledData | None = None   # labels used for training (the label-aware path)


@dataclass(frozen=True, eq=False)
class Fitted:
    """Stages 2-3: what was fitted and where its artifact is."""

    plan: Plan
    path: Path
    lineage: dict[str, Any]


@dataclass(frozen=True, eq=False)
class Calibrated:
    """Stages 4-5: the threshold and the metrics to stamp into the manifest."""

    threshold: float
    metrics: dict[str, Any] = field(default_factory=dict)


def _median_prep(X: np.ndarray) -> Preprocessing:
    with np.errstate(all="ignore"):
        median = np.nanmedian(np.where(np.isfinite(X), X, np.nan), axis=0)
    return Preprocessing.identity(X.shape[1], median=median)


def column_labels(spec: TrainSpec, table: pa.Table) -> np.ndarray:
    """The parsed labels (-1 unlabelled, 0, 1) of ``spec.label_column`` in ``table``."""
    name = spec.label_column
    if name is None or name not in table.column_names:
        raise DataError(f"{spec.data}: label column {name!r} not found; columns are {list(table.column_names)[:20]}")
    return parse_labels(table.column(name), name, str(spec.data))


def load(spec: TrainSpec, table: pa.Table, label_aware: bool) -> Loaded:
    """Stage 1: the rows of ``table`` (``spec.data``, read once by the caller) with their labels:
    for training when ``label_aware`` (plus ``spec.feedback``), else a fully labelled 0/1 column
    for evaluation only."""
    if spec.features is None:
        check_no_label_like(spec.data, [c for c in table.column_names if c != spec.label_column])
    if label_aware:
        ld = labelled_data(table, spec.data, spec.label_column, feedback=spec.feedback, model=spec.model,
                           registry=spec.registry, feature_names=spec.features)
        return Loaded(ld.X, ld.feature_names, ld.warnings, ld.n_file_rows, labelled=ld)
    ds = dataset_from_table(table, spec.data, label_column=spec.label_column, feature_names=spec.features)
    return Loaded(ds.X, ds.feature_names, ds.warnings, ds.n_rows, eval_labels=ds.labels)


def resolve_detector(spec: TrainSpec, loaded: Loaded) -> tuple[str, dict[str, Any] | None]:
    """The detector to plan for, and (when none was given) what the default resolved to and why.

    An explicit ``spec.detector`` is kept. The default is iforest, unless labels are used for
    training (a partially labelled column, feedback records) with at least
    :data:`~outlierd.training.semi.MIN_SELECT_LABELS` anomalies and as many normals: then it is
    ``auto`` (chosen out of fold; the stacked semi-supervised model once there are
    ``spec.min_labels`` of each kind), since with labels of both kinds the unsupervised model
    leaves most of what they say unused (issue 14, item 11)."""
    if spec.detector is not None:
        return spec.detector, None
    ld = loaded.labelled
    choice: dict[str, Any] = {"given": False, "default": DEFAULT_DETECTOR}
    if ld is None:
        reason = ("labels for evaluation only (every row labelled)" if loaded.eval_labels is not None
                  else "no labels for training")
        return DEFAULT_DETECTOR, {**choice, "resolved": DEFAULT_DETECTOR, "reason": reason}
    na, nn = ld.anomalies, ld.normals
    counts = f"{na} labelled anomalies and {nn} labelled normals"
    if na >= MIN_SELECT_LABELS and nn >= MIN_SELECT_LABELS:
        reason = (f"{counts} (at least {MIN_SELECT_LABELS} of each): chosen out of fold as --detector auto does "
                  f"(the stacked semi-supervised model needs --min-labels {spec.min_labels} of each)")
        return AUTO, {**choice, "resolved": AUTO, "reason": reason, "anomalies": na, "normals": nn}
    reason = (f"{counts}: fewer than {MIN_SELECT_LABELS} of each kind to choose out of fold; {DEFAULT_DETECTOR} "
              "fitted without the known anomalies")
    return DEFAULT_DETECTOR, {**choice, "resolved": DEFAULT_DETECTOR, "reason": reason, "anomalies": na, "normals": nn}


def choose(spec: TrainSpec, loaded: Loaded, log: Callable[[str], None] | None) -> Plan:
    """Stage 2: the detector to fit (with labels: compared out of fold; the default resolved by
    :func:`resolve_detector`)."""
    detector, choice = resolve_detector(spec, loaded)
    if loaded.labelled is None:
        p = Plan(detector)
    else:
        if choice is not None and log:
            log(f"  default detector: {choice['resolved']} ({choice['reason']})")
        p = plan(loaded.labelled, detector=detector, select=spec.candidates, min_labels=spec.min_labels,
                 folds=spec.folds, seed=spec.seed, log=log)
    if choice is not None:
        p.detector_choice = {**choice, "chosen": p.chosen}
    return p


def _lineage(spec: TrainSpec, loaded: Loaded, p: Plan) -> dict[str, Any]:
    """Data, parameters (``detector``: as given, or what the default resolved to) and labels; when
    no detector was given, ``detector_choice`` says what the default resolved to, why, and what
    was fitted."""
    detector = spec.detector if p.detector_choice is None else p.detector_choice["resolved"]
    params: dict[str, Any] = {"detector": detector, "seed": spec.seed, "alert_rate": spec.alert_rate,
                              "label_column": spec.label_column}
    if spec.features is not None:
        params["feature_columns"] = spec.features
    lineage: dict[str, Any] = {"data": data_lineage(spec.data, loaded.n_file_rows, loaded.feature_names), "parameters": params}
    ld = loaded.labelled
    if ld is not None:
        params.update(select=list(spec.candidates), labels_from_feedback=spec.feedback is not None, min_labels=spec.min_labels,
                      folds=spec.folds)
        prov = ld.provenance
        lineage["labels"] = {**prov, "fit_rows": int(np.sum(ld.y != 1)), "excluded_anomalies": prov["anomalies"]}
    if p.detector_choice is not None:
        lineage["detector_choice"] = p.detector_choice
    return lineage


def fit_export(spec: TrainSpec, loaded: Loaded, p: Plan, dest: Path) -> Fitted:
    """Stage 3: fit the planned detector (without the known anomalies) and write its artifact."""
    lineage = _lineage(spec, loaded, p)
    ld = loaded.labelled
    if ld is None:
        path = fit_and_export(p.chosen, loaded.X, loaded.feature_names, _median_prep(loaded.X), spec.seed, dest, lineage)
    elif p.chosen == STACKED:
        path = export_stacked(ld, p, spec.seed, dest, lineage)
    else:
        path = export_candidate(p.chosen, ld.X[ld.y != 1], ld.feature_names, spec.seed, dest, lineage)
    return Fitted(p, path, lineage)


def calibrate(spec: TrainSpec, loaded: Loaded, fitted: Fitted) -> tuple[Calibrated, np.ndarray]:
    """Stage 4: load the artifact (its one probe verification), score the training rows and set the
    threshold to the alert rate."""
    scores = load_model(fitted.path).score(loaded.X)
    threshold = threshold_for_alert_rate(scores, spec.alert_rate)
    metrics: dict[str, Any] = {"alert_rate": spec.alert_rate, "train_alert_rate": float(np.mean(scores >= threshold))}
    ld, p = loaded.labelled, fitted.plan
    if ld is not None:
        metrics.update(chosen=p.chosen, labels_anomalies=ld.provenance["anomalies"], labels_normals=ld.provenance["normals"])
        if p.chosen == STACKED:
            metrics.update(stacked_primary=p.bases[p.primary], stacked_alpha=p.alpha, stacked_bases=list(p.bases))
        if p.selection:
            metrics["selection_pr_auc"] = p.selection
        if p.notes:
            metrics["label_notes"] = p.notes
        if p.detector_choice is not None:
            metrics["detector_default"] = p.detector_choice["resolved"]
    return Calibrated(threshold, metrics), scores


def evaluate_stage(loaded: Loaded, p: Plan, cal: Calibrated, scores: np.ndarray) -> Calibrated:
    """Stage 5: metrics on labels: in sample for a fully labelled column, out of fold for labels
    used in training."""
    metrics = dict(cal.metrics)
    if loaded.eval_labels is not None:
        metrics.update(evaluate(scores, loaded.eval_labels, cal.threshold))
    elif p.oof is not None and p.oof_scores is not None:
        metrics.update(evaluate(p.oof_scores, p.oof.y, cal.threshold))
        metrics["label_eval"] = (f"{p.oof.k}-fold out-of-fold on {p.oof.y.size} labelled records (stratified; every "
                                 "fold's detectors fitted without it and without known anomalies"
                                 + ("; the detector was chosen on these same folds, so PR-AUC is optimistic)"
                                    if p.selection else ")"))
    return Calibrated(cal.threshold, metrics)


def publish(spec: TrainSpec, fitted: Fitted, cal: Calibrated) -> int:
    """Stage 6: stamp threshold and metrics, publish (the probe was verified in :func:`calibrate`;
    the registry still checks the digest and checksums) and move the alias."""
    rewrite_manifest(fitted.path, threshold=cal.threshold, metrics=cal.metrics)
    return Registry(spec.registry).publish(spec.model, fitted.path, aliases=(spec.alias,) if spec.alias else (),
                                           reprobe=False)


def run_train(spec: TrainSpec) -> TrainResult:
    """Run every stage of ``spec``; returns the published version with its threshold and metrics."""
    quiet = spec.quiet
    reg = Registry(spec.registry)

    def log(line: str) -> None:
        if not quiet:
            print(line, file=sys.stderr, flush=True)

    table, label_aware = None, spec.asks_for_labels
    replayed = None
    if spec.events_spec is not None:  # raw events: the features come from the spec, as the server computes them
        from .features import features_table, load_feature_spec, read_events, replay

        fspec = load_feature_spec(spec.events_spec)
        events = read_events(spec.data)
        log(f"replaying {events.num_rows} events through feature spec {spec.events_spec}")
        replayed = replay(fspec, events)
        table = features_table(replayed, events, [spec.label_column] if spec.label_column else [])
        spec = replace(spec, feature_columns=tuple(fspec.output_names))
    if spec.label_column is not None and not label_aware:
        # an empty cell in the label column makes it reviewers' labels, used for training
        table = read_table(spec.data) if table is None else table
        label_aware = bool(np.any(column_labels(spec, table) < 0))
    progress = Progress(7 if label_aware else 6, quiet=quiet)
    progress(f"loading {spec.data}")
    loaded = load(spec, read_table(spec.data) if table is None else table, label_aware)
    for w in loaded.warnings:
        print(f"warning: {w}", file=sys.stderr)
    ld = loaded.labelled
    if ld is not None:
        prov = ld.provenance
        progress(f"labels: {prov['anomalies']} anomalies, {prov['normals']} normals, {prov['unlabelled']} unlabelled of "
                 f"{ld.X.shape[0]} rows" + (f" ({ld.X.shape[0] - ld.n_file_rows} from the feedback store)"
                                            if spec.feedback is not None else ""))
    p = choose(spec, loaded, log)
    if ld is not None:
        fit_rows = int(np.sum(ld.y != 1))
        if fit_rows < 2:
            raise DataError(f"{spec.data}: fewer than 2 rows left once the known anomalies are removed")
        check_fit_rows(p.chosen, fit_rows, spec.data, "rows left once the known anomalies are removed")
        progress(f"fitting {p.chosen} on {fit_rows} rows ({ld.provenance['anomalies']} known anomalies left out)")
    else:
        check_fit_rows(p.chosen, int(loaded.X.shape[0]), spec.data)
        progress(f"fitting {p.chosen} on {loaded.n_file_rows} rows x {len(loaded.feature_names)} features")
    workdir = Path(tempfile.mkdtemp(prefix="outlierd-train-"))
    try:
        fitted = fit_export(spec, loaded, p, workdir / "artifact")
        if replayed is not None:
            from .features import add_to_artifact

            add_to_artifact(fitted.path, replayed.spec, replayed.fitted)
        progress("verifying the artifact and scoring the training data")
        cal, scores = calibrate(spec, loaded, fitted)
        if ld is not None:
            progress("evaluating on labelled records the model did not train on"
                     if p.oof_scores is not None else "evaluating (no out-of-fold scores: label metrics skipped)")
        else:
            progress("evaluating" + ("" if loaded.eval_labels is not None else " (no labels: metrics skipped)"))
        cal = evaluate_stage(loaded, p, cal, scores)
        progress(f"publishing to {spec.registry}")
        version = publish(spec, fitted, cal)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    progress(f"published {spec.model} version {version}" + (f" as {spec.alias!r}" if spec.alias else ""))
    return TrainResult(version, reg.path(spec.model, version), cal.threshold, cal.metrics, loaded.warnings,
                       int(loaded.X.shape[0]), len(loaded.feature_names))


def train(data: str | os.PathLike, registry: str | os.PathLike, model: str, **options: Any) -> TrainResult:
    """:func:`run_train` of ``TrainSpec(data, registry, model, **options)``: the keyword form that
    library callers and the retrain policy use (``detector``, ``label_column``, ``alert_rate``,
    ``alias``, ``seed``, ``quiet``, ``select``, ``feedback``, ``min_labels``, ``folds``, ``feature_columns``)."""
    return run_train(TrainSpec(data, registry, model, **options))
