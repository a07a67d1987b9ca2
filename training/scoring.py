"""Batch scoring of a file or dataset with a registry model (``outlierd score``).

Streamed in bounded record batches (:mod:`training.batch`), locally or partition by partition on a
Dask cluster (:mod:`training.dask_scoring`); the output goes to a file as it is produced.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, TextIO

import numpy as np

from outlierd.core.model import load_model
from outlierd.core.registry import Registry

from .batch import DEFAULT_BATCH_ROWS, BatchScoring, Columns, RowProgress, check_output, open_source, stream_score

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


def _check_options(top_k: int | None, n_features: int, batch_rows: int) -> None:
    if top_k is not None and not 1 <= top_k <= n_features:
        raise ValueError(f"--top-k must be between 1 and the model's {n_features} features; got {top_k}")
    if batch_rows < 1:
        raise ValueError(f"--batch-rows must be >= 1; got {batch_rows}")


def score_file(
    data: str | os.PathLike,
    registry: str | os.PathLike,
    model: str,
    ref: str = "champion",
    *,
    out: str | os.PathLike | None = None,
    label_column: str | None = None,
    quiet: bool = False,
    backend: str = "numba",
    device: str = "auto",
    id_column: str | None = None,
    explain: bool = False,
    top_k: int = DEFAULT_TOP_K,
    explain_flagged_only: bool = False,
    batch_rows: int = CHUNK_ROWS,
    keep_scores: bool = True,
    dask: str | None = None,
    dask_workers: int = 2,
    progress_stream: TextIO | None = None,
) -> ScoreResult:
    """Score every record of ``data`` (a CSV/Parquet file or a directory of them) with ``model``
    at ``ref`` (version or alias), streamed in batches of ``batch_rows`` records with a progress
    line on stderr. Scores are float64, higher = more anomalous; ``anomalous`` is
    ``score >= threshold``.

    ``out``: write ``[id_column,] score, anomalous, version`` (and with ``explain``,
    ``top1_feature, top1_contribution, ...`` up to ``top_k``; only flagged records explained with
    ``explain_flagged_only``) to a .csv or .parquet file, in input order. ``label_column``:
    evaluate at the model's threshold (keeps scores and labels, not the table, in memory).
    ``keep_scores``: return every score in ``ScoreResult.scores`` (O(rows) memory; the CLI turns
    it off). ``dask``: a scheduler address or ``"local"`` (a LocalCluster of ``dask_workers``
    processes) to score a Parquet input partition by partition on a cluster; the version is
    resolved once here, so an alias moving mid-job changes nothing.
    """
    source = open_source(data)  # a missing or unreadable input fails before any model is loaded
    if out is not None:
        check_output(out)
    reg = Registry(registry)
    version = reg.resolve(model, ref)
    path = reg.path(model, version)
    m = load_model(path, backend=backend, device=device)
    _check_options(top_k if explain else None, m.n_features, batch_rows)
    if explain and not hasattr(m, "score_explain"):
        raise ValueError("--explain needs Model.score_explain, which this outlierd's core does not have yet")
    # the threshold in force, as a server serving this version uses: its latest threshold version
    threshold, threshold_version = reg.threshold(model, version)
    how = BatchScoring(Columns(tuple(m.feature_names), id_column, label_column), version,
                       top_k=top_k if explain else None, flagged_only=explain_flagged_only, threshold=threshold)
    progress = RowProgress(source.total_rows, stream=progress_stream, quiet=quiet)
    t0 = time.perf_counter()
    if dask is not None:
        from .dask_scoring import score_on_dask

        stats = score_on_dask(source, path, how, address=dask, n_workers=dask_workers, out=out, batch_rows=batch_rows,
                              keep_scores=keep_scores, progress=progress, backend=backend, device=device)
    else:
        stats = stream_score(source, m, how, out=out, batch_rows=batch_rows, keep_scores=keep_scores, progress=progress)
    seconds = time.perf_counter() - t0
    scores = np.concatenate(stats.scores) if stats.scores else (np.empty(0) if keep_scores or label_column else None)
    metrics: dict[str, Any] = {}
    if label_column is not None:
        from .evaluate import evaluate  # scikit-learn: imported only when there is something to evaluate

        labels = np.concatenate(stats.labels) if stats.labels else np.empty(0, dtype=np.int8)
        metrics = evaluate(scores, labels, threshold)
        if not keep_scores:
            scores = None
    return ScoreResult(model, version, stats.rows, stats.anomalies, seconds, scores, metrics, m.backend, m.device,
                       explained=stats.explained, mode="dask" if dask is not None else "local",
                       output=None if out is None else str(out), setup_seconds=stats.setup_seconds,
                       threshold=threshold, threshold_version=threshold_version)
