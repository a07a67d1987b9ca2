"""Batch scoring of a file with a registry model (``outlierd score``)."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from core.model import load_model
from core.registry import Registry

from .data import load_dataset
from .evaluate import evaluate

CHUNK_ROWS = 65536


@dataclass
class ScoreResult:
    model: str
    version: int
    rows: int
    anomalies: int
    seconds: float
    scores: np.ndarray
    metrics: dict[str, Any]
    backend: str = "numba"
    device: str = "cpu"


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
) -> ScoreResult:
    """Score every record of ``data`` with ``model`` at ``ref`` (version or alias), in chunks,
    showing progress; optionally write ``score`` and ``anomalous`` columns to ``out`` (CSV or
    Parquet by extension). With labels, evaluate at the model's threshold."""
    reg = Registry(registry)
    version = reg.resolve(model, ref)
    m = load_model(reg.path(model, version), backend=backend, device=device)
    ds = load_dataset(data, label_column=label_column, feature_names=m.feature_names, require_rows=0)
    n = ds.n_rows
    scores = np.empty(n)
    t0 = time.perf_counter()
    for lo in range(0, n, CHUNK_ROWS):
        hi = min(lo + CHUNK_ROWS, n)
        scores[lo:hi] = m.score(ds.X[lo:hi])
        if not quiet and n > CHUNK_ROWS:
            print(f"scored {hi}/{n} records", file=sys.stderr, flush=True)
    seconds = time.perf_counter() - t0
    flagged = scores >= m.threshold
    metrics = evaluate(scores, ds.labels, m.threshold) if ds.labels is not None else {}
    if out is not None:
        _write_scores(Path(out), scores, flagged)
    return ScoreResult(model, version, n, int(flagged.sum()), seconds, scores, metrics, m.backend, m.device)


def _write_scores(path: Path, scores: np.ndarray, flagged: np.ndarray) -> None:
    import pyarrow as pa

    table = pa.table({"score": scores, "anomalous": flagged})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    if path.suffix.lower() in (".parquet", ".pq"):
        import pyarrow.parquet as pq

        pq.write_table(table, tmp)
    else:
        import pyarrow.csv as pacsv

        pacsv.write_csv(table, tmp)
    os.replace(tmp, path)
