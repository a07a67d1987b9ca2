"""Batch scoring of a Parquet file or dataset on a Dask cluster (``outlierd score --dask``).

The client plans partitions (runs of whole row groups, one file at a time, in input order),
submits one task per partition to the cluster through ``distributed.Client.submit`` -- at most a
few per worker thread in flight, so neither side holds more than a few partitions -- and writes
the results in input order with the same writer as local scoring. The model version is resolved
once on the client and the workers load that version's artifact directory (immutable) once per
process, so every row is scored by the same version even if an alias moves mid-job.

Workers read the input and the registry by path: on a real cluster both must be on storage the
workers see at the same paths, and the workers need outlierd installed (checked before the job
starts). ``--dask local`` starts a ``LocalCluster`` whose worker processes get this checkout on
their ``PYTHONPATH``, so it works from a source tree as well as installed.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from outlierd.core.errors import DataError, InvalidInputError, MissingDependencyError, UnavailableError
from .batch import PARQUET_BUFFER_BYTES, BatchScoring, RowProgress, ScoreWriter, Source, StreamStats, label_array, score_batch

LABEL_FIELD = "__outlierd_label__"
# partitions in flight per worker thread: enough to keep workers busy while the client writes
IN_FLIGHT_PER_THREAD = 2


@dataclass(frozen=True)
class Part:
    """One task: whole row groups of one Parquet file."""

    index: int
    path: str
    row_groups: tuple[int, ...]
    rows: int
    first_row: int                                   # row number of its first row in the whole input
    partition: tuple[tuple[str, Any], ...] = ()     # hive partition values (column, value) of its file


@dataclass(frozen=True)
class Job:
    artifact: str           # the resolved version's artifact directory
    backend: str
    device: str
    how: BatchScoring
    partition_types: tuple[tuple[str, Any], ...] = ()   # hive column -> pa.DataType


def plan_parts(source: Source, target_rows: int) -> list[Part]:
    """Partitions of ``source`` (a Parquet file or dataset) in input order: consecutive row groups
    of a file, ``target_rows`` rows or more each (one row group at least)."""
    import pyarrow.parquet as pq

    if source.kind == "parquet":
        files: list[tuple[Path, tuple[tuple[str, Any], ...]]] = [(source.path, ())]
    elif source.kind == "dataset":
        import pyarrow.dataset as pads

        files = []
        for frag in source.dataset.get_fragments():  # type: ignore[attr-defined]
            keys = pads.get_partition_keys(frag.partition_expression)
            files.append((Path(frag.path), tuple(sorted(keys.items()))))
    else:
        raise DataError(f"--dask scores Parquet input (a .parquet file or a directory of them); {source.path} is not: "
                        "convert it, or score it without --dask")
    parts: list[Part] = []
    first = 0
    for path, partition in files:
        meta = pq.ParquetFile(path).metadata
        groups: list[int] = []
        rows = 0
        for g in range(meta.num_row_groups):
            groups.append(g)
            rows += meta.row_group(g).num_rows
            if rows >= target_rows:
                parts.append(Part(len(parts), str(path), tuple(groups), rows, first, partition))
                first += rows
                groups, rows = [], 0
        if groups:
            parts.append(Part(len(parts), str(path), tuple(groups), rows, first, partition))
            first += rows
    return parts


# ------------------------------------------------------------------------------------------------
# Worker side
# ------------------------------------------------------------------------------------------------

_MODELS: dict[tuple[str, str, str], Any] = {}
_MODELS_LOCK = threading.Lock()


def _worker_model(job: Job) -> Any:
    """The job's model, loaded (and probe-verified) once per worker process."""
    key = (job.artifact, job.backend, job.device)
    with _MODELS_LOCK:
        model = _MODELS.get(key)
        if model is None:
            from outlierd.core.model import load_model

            model = _MODELS[key] = load_model(job.artifact, backend=job.backend, device=job.device)
        return model


def preload(job: Job) -> str:
    """Worker warm-up (``Client.run``): load the job's model before the first partition arrives."""
    return repr(_worker_model(job))


def score_part(part: Part, job: Job) -> pa.Table:
    """Worker task: read ``part``'s row groups, score them, return the output columns (plus the
    labels under ``LABEL_FIELD`` when the job evaluates)."""
    import pyarrow.parquet as pq

    model = _worker_model(job)
    pf = pq.ParquetFile(part.path, pre_buffer=False, buffer_size=PARQUET_BUFFER_BYTES)
    names = set(pf.schema_arrow.names)
    table = pf.read_row_groups(list(part.row_groups), columns=[c for c in job.how.columns.read if c in names])
    types = dict(job.partition_types)
    for col, value in part.partition:  # hive partition keys live in the path, not the file
        if col in job.how.columns.read and col not in names:
            table = table.append_column(col, pa.array([value] * table.num_rows).cast(types[col]))
    job.how.columns.check(table.schema, part.path)
    batch = table.combine_chunks().to_batches()
    rb = batch[0] if batch else pa.RecordBatch.from_pylist([], schema=table.schema)
    out, _ = score_batch(model, rb, job.how, first_row=part.first_row, where=part.path)
    result = pa.Table.from_batches([out])
    if job.how.columns.label_column is not None:
        labels = label_array(rb, job.how.columns.label_column, part.path, part.first_row)
        result = result.append_column(LABEL_FIELD, pa.array(labels, pa.int8()))
    return result


# ------------------------------------------------------------------------------------------------
# Client side
# ------------------------------------------------------------------------------------------------


@contextmanager
def dask_client(address: str, n_workers: int = 2) -> Iterator[Any]:
    """A ``distributed.Client`` on ``address``, or on a fresh LocalCluster of ``n_workers``
    single-threaded worker processes for ``"local"``; closed (cluster included) on exit."""
    try:
        from distributed import Client, LocalCluster
    except ImportError as e:
        raise MissingDependencyError("--dask needs the dask extra: pip install 'outlierd[dask]'") from e
    import logging

    if address == "local":
        if n_workers < 1:
            raise InvalidInputError(f"--dask-workers must be >= 1; got {n_workers}")
        # workers are spawned processes of this interpreter: they import the installed outlierd
        cluster = LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                               dashboard_address=None, silence_logs=logging.ERROR)
        try:
            with Client(cluster) as client:
                yield client
        finally:
            cluster.close()
        return
    try:
        client = Client(address, timeout="15s")
    except (OSError, TimeoutError) as e:
        raise UnavailableError(f"--dask {address}: cannot reach the Dask scheduler: {e}") from e
    try:
        yield client
    finally:
        client.close()


def _check_workers(client: Any) -> None:
    try:
        client.run(exec, "import outlierd.core.model, outlierd.training.dask_scoring")
    except Exception as e:  # ModuleNotFoundError raised on a worker, re-raised here
        raise UnavailableError(f"--dask: the Dask workers cannot import outlierd ({type(e).__name__}: {e}); install outlierd "
                               "on the workers (the same version as here)") from e


def score_on_dask(source: Source, artifact: str | os.PathLike, how: BatchScoring, *, address: str,
                  n_workers: int = 2, out: str | os.PathLike | None = None, batch_rows: int = 65536,
                  keep_scores: bool = False, progress: RowProgress | None = None, backend: str = "numba",
                  device: str = "auto") -> StreamStats:
    """Score ``source`` (Parquet) on a Dask cluster partition by partition; write ``out`` in input
    order, the same columns as :func:`training.batch.stream_score` writes."""
    how.columns.check(source.schema, source.path)
    parts = plan_parts(source, batch_rows)
    partition_types = tuple((f.name, f.type) for f in source.schema if f.name not in _file_columns(source))
    # each worker thread scores on one core: the cluster is the parallelism
    job = Job(str(artifact), backend, device, replace(how, parallel=False), partition_types)
    id_field = source.schema.field(how.columns.id_column) if how.columns.id_column else None
    stats = StreamStats()
    progress = progress or RowProgress(source.total_rows, quiet=True)
    writer = ScoreWriter(out, how.schema(id_field)) if out is not None else None
    try:
        t0 = time.perf_counter()
        with dask_client(address, n_workers) as client:
            _check_workers(client)
            client.run(preload, job)  # every worker loads (and probe-verifies) the artifact once, in parallel
            stats.setup_seconds = time.perf_counter() - t0
            window = max(2, IN_FLIGHT_PER_THREAD * sum(client.nthreads().values()))
            run = uuid.uuid4().hex
            todo = iter(parts)
            pending: deque[Any] = deque()

            def submit() -> None:
                part = next(todo, None)
                if part is not None:
                    pending.append(client.submit(score_part, part, job, key=f"outlierd-score-{run}-{part.index}"))

            for _ in range(window):
                submit()
            while pending:
                fut = pending.popleft()
                table = fut.result()
                fut.release()
                submit()
                labels = None
                if LABEL_FIELD in table.column_names:
                    labels = table.column(LABEL_FIELD).to_numpy()
                    table = table.drop_columns([LABEL_FIELD])
                scores = table.column("score").to_numpy()
                if writer is not None:
                    for b in table.to_batches():
                        writer.write(b)
                flagged = int(np.count_nonzero(table.column("anomalous").to_numpy(zero_copy_only=False)))
                stats.rows += table.num_rows
                stats.anomalies += flagged
                if how.top_k and table.num_rows:
                    stats.explained += table.num_rows - table.column("top1_feature").null_count
                if keep_scores or labels is not None:
                    stats.scores.append(np.asarray(scores, dtype=np.float64))
                if labels is not None:
                    stats.labels.append(labels.astype(np.int8))
                progress.update(table.num_rows)
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    if writer is not None:
        writer.close()
    progress.close()
    return stats


def _file_columns(source: Source) -> set[str]:
    """Columns stored in the files (the rest of the dataset schema are hive partition keys)."""
    import pyarrow.parquet as pq

    return set(pq.ParquetFile(source.files[0]).schema_arrow.names) if source.files else set()
