"""Batch scoring of a file or dataset with a registry model (``outlierd score``).

Streamed in bounded record batches (:mod:`training.batch`), locally or partition by partition on a
Dask cluster (:mod:`training.dask_scoring`); the output goes to a file as it is produced.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, TextIO

import numpy as np

from outlierd.core.backends import BACKENDS, DEVICES
from outlierd.core.errors import InvalidInputError
from outlierd.core.model import load_model
from outlierd.core.registry import CHAMPION, Registry, validate_name

from .batch import DEFAULT_BATCH_ROWS, BatchScoring, Columns, RowProgress, check_output, open_source, stream_score
from .input_check import InputCheck, calibrated_alert_rate, ignored_columns, input_warnings

CHUNK_ROWS = DEFAULT_BATCH_ROWS
DEFAULT_TOP_K = 3


@dataclass
class ScoreResult:
    model: str
    version: int
    rows: int
    anomalies: int
    seconds: float
    scores: np.ndarray | None      # every score in input order; None when keep_scores=False and no labels
    metrics: dict[str, Any]
    backend: str = "numba"
    device: str = "cpu"
    explained: int = 0             # records with explanations in the output
    mode: str = "local"            # "local" or "dask"
    output: str | None = None
    setup_seconds: float = 0.0     # part of ``seconds`` spent starting/reaching a Dask cluster and loading the model there
    threshold: float = float("nan")  # the threshold ``anomalous`` was computed at
    threshold_version: int = 0     # its threshold version (0: the artifact's own threshold)
    # the input checked against the model (``training.input_check``): ignored columns, values far
    # outside the training range (local mode), an alert rate far from the calibrated one
    warnings: list[str] = field(default_factory=list)


def _check_name(model: str) -> None:
    try:
        validate_name(model)
    except ValueError as e:
        raise InvalidInputError(str(e)) from e


@dataclass(frozen=True)
class ScoreSpec:
    """An ``outlierd score`` job: score every record of ``data`` with ``model`` at ``ref``.

    ``out``: write ``[id_column,] score, anomalous, version`` (and with ``explain``, the top
    ``top_k`` features; only for flagged records with ``explain_flagged_only``). ``label_column``:
    evaluate at the model's threshold. ``keep_scores``: return every score (O(rows) memory).
    ``dask``: a scheduler address or ``"local"`` (a LocalCluster of ``dask_workers`` processes).
    """

    data: str | os.PathLike
    registry: str | os.PathLike
    model: str
    ref: str | int = CHAMPION
    out: str | os.PathLike | None = None
    label_column: str | None = None
    quiet: bool = False
    backend: str = "numba"
    device: str = "auto"
    id_column: str | None = None
    explain: bool = False
    top_k: int = DEFAULT_TOP_K
    explain_flagged_only: bool = False
    batch_rows: int = CHUNK_ROWS
    keep_scores: bool = True
    dask: str | None = None
    dask_workers: int = 2
    progress_stream: TextIO | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        _check_name(self.model)
        if self.backend not in BACKENDS:
            raise InvalidInputError(f"--backend must be one of {', '.join(BACKENDS)}; got {self.backend!r}")
        if self.device not in DEVICES:
            raise InvalidInputError(f"--device must be one of {', '.join(DEVICES)}; got {self.device!r}")
        if self.explain_flagged_only and not self.explain:
            raise InvalidInputError("--explain-flagged-only needs --explain")
        # its range (1 to the model's feature count) is checked once the model is loaded
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, (int, np.integer)):
            raise InvalidInputError(f"--top-k must be an integer; got {self.top_k!r}")
        if isinstance(self.batch_rows, bool) or not isinstance(self.batch_rows, (int, np.integer)) or self.batch_rows < 1:
            raise InvalidInputError(f"--batch-rows must be >= 1; got {self.batch_rows}")
        if self.dask == "local":
            if isinstance(self.dask_workers, bool) or not isinstance(self.dask_workers, (int, np.integer)) or self.dask_workers < 1:
                raise InvalidInputError(f"--dask-workers must be >= 1; got {self.dask_workers}")


def _check_top_k(top_k: int, n_features: int) -> None:
    if not 1 <= top_k <= n_features:
        raise InvalidInputError(f"--top-k must be between 1 and the model's {n_features} features; got {top_k}")


def score_file(data: str | os.PathLike, registry: str | os.PathLike, model: str, ref: str | int = CHAMPION,
               **options: Any) -> ScoreResult:
    """:func:`run_score` of ``ScoreSpec(data, registry, model, ref, **options)`` (the keyword form)."""
    return run_score(ScoreSpec(data, registry, model, ref, **options))


def run_score(spec: ScoreSpec) -> ScoreResult:
    """Score every record of ``spec.data`` (a CSV/Parquet file or a directory of them) with
    ``spec.model`` at ``spec.ref`` (version or alias), streamed in batches of ``batch_rows``
    records with a progress line on stderr. Scores are float64, higher = more anomalous;
    ``anomalous`` is ``score >= threshold``. With ``dask`` the version is resolved once here, so an
    alias moving mid-job changes nothing.
    """
    data, out, label_column, explain = spec.data, spec.out, spec.label_column, spec.explain
    backend, device, batch_rows, keep_scores, dask = spec.backend, spec.device, spec.batch_rows, spec.keep_scores, spec.dask
    source = open_source(data)  # a missing or unreadable input fails before any model is loaded
    if out is not None:
        check_output(out)
    model = spec.model
    reg = Registry(spec.registry)
    version = reg.resolve(model, spec.ref)
    path = reg.path(model, version)
    m = load_model(path, backend=backend, device=device)
    if explain:
        _check_top_k(spec.top_k, m.n_features)
    # the threshold in force, as a server serving this version uses: its latest threshold version
    threshold, threshold_version = reg.threshold(model, version)
    how = BatchScoring(Columns(tuple(m.feature_names), spec.id_column, label_column), version,
                       top_k=spec.top_k if explain else None, flagged_only=spec.explain_flagged_only, threshold=threshold)
    progress = RowProgress(source.total_rows, stream=spec.progress_stream, quiet=spec.quiet)
    check: InputCheck | None = InputCheck.from_reference(m.reference, m.feature_names)
    t0 = time.perf_counter()
    if dask is not None:
        from .dask_scoring import score_on_dask

        # the batches are scored on the workers: no range check (columns and alert rate still are)
        check = None
        stats = score_on_dask(source, path, how, address=dask, n_workers=spec.dask_workers, out=out, batch_rows=batch_rows,
                              keep_scores=keep_scores, progress=progress, backend=backend, device=device)
    else:
        stats = stream_score(source, m, how, out=out, batch_rows=batch_rows, keep_scores=keep_scores, progress=progress,
                             observe=None if check is None else check.observe)
    seconds = time.perf_counter() - t0
    record = reg.thresholds(model, version)[-1] if threshold_version else None
    # the model's own training label column is expected beside its features: not "ignored"
    params = (m.manifest.get("lineage") or {}).get("parameters") or {}
    trained_label = params.get("label_column") if isinstance(params.get("label_column"), str) else None
    warnings = input_warnings(ignored=ignored_columns(source.schema.names, m.feature_names, spec.id_column, label_column,
                                                      trained_label),
                              check=check, rows=stats.rows, anomalies=stats.anomalies,
                              expected_rate=calibrated_alert_rate(m.metrics, record))
    scores = np.concatenate(stats.scores) if stats.scores else (np.empty(0) if keep_scores or label_column else None)
    metrics: dict[str, Any] = {}
    if label_column is not None:
        from .evaluate import evaluate  # scikit-learn: imported only when there is something to evaluate

        labels = np.concatenate(stats.labels) if stats.labels else np.empty(0, dtype=np.int8)
        assert scores is not None  # kept whenever there is a label column
        metrics = evaluate(scores, labels, threshold)
        if not keep_scores:
            scores = None
    return ScoreResult(model, version, stats.rows, stats.anomalies, seconds, scores, metrics, m.backend, m.device,
                       explained=stats.explained, mode="dask" if dask is not None else "local",
                       output=None if out is None else str(out), setup_seconds=stats.setup_seconds,
                       threshold=threshold, threshold_version=threshold_version, warnings=warnings)
