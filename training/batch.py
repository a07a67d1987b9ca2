"""Streamed batch scoring: CSV and Parquet in bounded record batches through pyarrow.

Input (:func:`open_source`): a ``.csv``/``.csv.gz``/``.tsv`` file (``pyarrow.csv.open_csv``), a
``.parquet``/``.pq`` file (``ParquetFile.iter_batches``), a directory of Parquet files -- a Parquet
dataset, hive partitions included (``pyarrow.dataset``) -- or a directory of CSV and/or Parquet
files, read one after the other in sorted path order. Files whose name starts with ``.`` or ``_``
(``_SUCCESS``, ``_metadata``, checksums) are skipped.

Output (:class:`ScoreWriter`): one row per input row, in input order: ``[id column]``, ``score``
(float64, higher = more anomalous), ``anomalous`` (``score >= threshold``, the threshold in force:
the version's latest published threshold version, else its artifact's), ``version`` (the
registry version that scored the row), and with explanations ``top1_feature`` (feature name, null
when the row was not explained), ``top1_contribution`` (float64, NaN when not explained), ... up to
``top<k>``. Written batch by batch (``ParquetWriter`` / ``CSVWriter``) to a temporary file renamed
into place at the end, so a failed job leaves no half-written output.

Only one input batch, its scores and one output batch are alive at a time (plus pyarrow's small,
bounded read-ahead): memory stays flat in the input size. With labels, the scores and labels
(16 bytes a row) are kept for the evaluation, not the table.
"""

from __future__ import annotations

import os
import sys
import time
from collections import deque
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import pyarrow as pa

from outlierd.core.errors import DataError, InvalidInputError

from .data import first_non_numeric, non_numeric_message, printable

DEFAULT_BATCH_ROWS = 65536
PARQUET_SUFFIXES = (".parquet", ".pq")
CSV_SUFFIXES = (".csv", ".csv.gz", ".tsv", ".tsv.gz")
# bytes of CSV text per block read by pyarrow.csv.open_csv: bounds the CSV reader's memory
CSV_BLOCK_BYTES = 8 << 20
# Parquet reads: buffered 1 MiB at a time instead of pre-buffering whole row groups (pyarrow's
# default), which keeps the reader's memory near one row group's decoded columns
PARQUET_BUFFER_BYTES = 1 << 20
# output batches queued for the writer thread before scoring waits for it
WRITE_BEHIND = 2


def _kind(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    if name.endswith(CSV_SUFFIXES):
        return "csv"
    return None


def _is_numeric(t: pa.DataType) -> bool:
    return (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)
            or pa.types.is_decimal(t) or pa.types.is_null(t))


# ------------------------------------------------------------------------------------------------
# Columns: which to read, validated against a schema once per file
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Columns:
    """The input columns a scoring job reads: the model's features (in the model's order), an
    optional id column passed through to the output, an optional 0/1 label column."""

    features: tuple[str, ...]
    id_column: str | None = None
    label_column: str | None = None

    @property
    def read(self) -> list[str]:
        out = list(self.features)
        for c in (self.id_column, self.label_column):
            if c is not None and c not in out:
                out.append(c)
        return out

    def check(self, schema: pa.Schema, where: Any) -> None:
        """Raise :class:`DataError` naming the first problem: a duplicate, missing or non-numeric
        column."""
        names = list(schema.names)
        if len(set(names)) != len(names):
            dupes = sorted({c for c in names if names.count(c) > 1})
            raise DataError(f"{where}: duplicate column names {dupes}")
        missing = [c for c in self.features if c not in names]
        if missing:
            raise DataError(f"{where}: the model's feature columns {missing[:10]} are missing from the data "
                            f"(columns: {names[:20]})")
        for c in self.features:
            t = schema.field(c).type
            if not _is_numeric(t):
                raise DataError(f"{where}: feature column {c!r} has type {t}; the model needs numeric features: "
                                "encode it as numbers")
        if self.id_column is not None and self.id_column not in names:
            raise DataError(f"{where}: id column {self.id_column!r} not found; columns are {names[:20]}")
        if self.label_column is not None:
            if self.label_column not in names:
                raise DataError(f"{where}: label column {self.label_column!r} not found; columns are {names[:20]}")
            t = schema.field(self.label_column).type
            if not _is_numeric(t):
                raise DataError(f"{where}: label column {self.label_column!r} has type {t}; it must hold 0 or 1")


def feature_matrix(batch: pa.RecordBatch | pa.Table, features: tuple[str, ...] | list[str]) -> np.ndarray:
    """The batch's feature values as a C-contiguous ``(n, d)`` array, as the file holds them:
    float32 when every feature column is float32, float64 otherwise (integers, booleans and
    decimals converted, nulls as NaN) -- what ``Model.score`` gets for the same values."""
    cols = [batch.column(name) for name in features]
    dtype = np.float32 if all(c.type == pa.float32() for c in cols) else np.float64
    X = np.empty((batch.num_rows, len(cols)), dtype=dtype)
    target = pa.float32() if dtype == np.float32 else pa.float64()
    for j, col in enumerate(cols):
        if pa.types.is_null(col.type):
            X[:, j] = np.nan
        else:
            X[:, j] = col.cast(target).to_numpy(zero_copy_only=False)
    return X


def label_array(batch: pa.RecordBatch | pa.Table, name: str, where: Any, first_row: int) -> np.ndarray:
    """The 0/1 labels of a batch as int8; :class:`DataError` on a missing or other value."""
    col = batch.column(name)
    if col.null_count:
        raise DataError(f"{where}: label column {name!r} has missing values (near row {first_row})")
    lab = col.cast(pa.float64()).to_numpy(zero_copy_only=False) if not pa.types.is_null(col.type) else np.full(len(col), np.nan)
    bad = ~np.isin(lab, (0.0, 1.0))
    if bad.any():
        examples = sorted(set(lab[bad].tolist()))[:5]
        raise DataError(f"{where}: label column {name!r} must hold 0 (normal) or 1 (anomaly); found {examples}")
    return lab.astype(np.int8)


# ------------------------------------------------------------------------------------------------
# Sources
# ------------------------------------------------------------------------------------------------


class Source:
    """Record batches of one input, in order. ``total_rows`` is known for Parquet (metadata)."""

    path: Path
    kind: str            # "csv", "parquet" (one file), "dataset" (Parquet directory), "files" (mixed directory)
    total_rows: int | None
    files: list[Path]
    schema: pa.Schema    # the columns as read (the first file's, for a directory)

    def batches(self, columns: Columns, batch_rows: int) -> Generator[pa.RecordBatch, None, None]:
        raise NotImplementedError


def _slices(batch: pa.RecordBatch, batch_rows: int) -> Iterator[pa.RecordBatch]:
    if batch.num_rows <= batch_rows:
        if batch.num_rows:
            yield batch
        return
    for lo in range(0, batch.num_rows, batch_rows):
        yield batch.slice(lo, batch_rows)


class CsvSource(Source):
    kind = "csv"

    def __init__(self, path: Path):
        self.path, self.files, self.total_rows = path, [path], None
        import pyarrow.csv as pacsv

        name = path.name.lower()
        self._parse = pacsv.ParseOptions(delimiter="\t" if name.endswith((".tsv", ".tsv.gz")) else ",")
        try:
            # opening reads (and infers types from) the first block only
            with pacsv.open_csv(path, read_options=pacsv.ReadOptions(block_size=CSV_BLOCK_BYTES), parse_options=self._parse) as r:
                self.schema = r.schema
        except (pa.ArrowInvalid, OSError) as e:
            raise DataError(f"cannot read {path}: {printable(e, 300)}") from e

    def _non_numeric_cell(self, column: str) -> None:
        """Raise :class:`DataError` naming the first cell of ``column`` (read as text: the first
        block held something that is not a number) that is not a number, with its row."""
        import pyarrow.csv as pacsv

        convert = pacsv.ConvertOptions(include_columns=[column], column_types={column: pa.string()})
        row = 0
        with pacsv.open_csv(self.path, read_options=pacsv.ReadOptions(block_size=CSV_BLOCK_BYTES),
                            parse_options=self._parse, convert_options=convert) as reader:
            for batch in reader:
                bad = first_non_numeric(batch.column(0), row)
                if bad is not None:
                    raise DataError(f"{self.path}: " + non_numeric_message(
                        f"feature column {column!r} has type string; the model needs numeric features", *bad))
                row += batch.num_rows

    def batches(self, columns: Columns, batch_rows: int) -> Generator[pa.RecordBatch, None, None]:
        import pyarrow.csv as pacsv

        for c in columns.features:
            if c in self.schema.names and pa.types.is_string(self.schema.field(c).type):
                try:
                    self._non_numeric_cell(c)
                except pa.ArrowInvalid as e:
                    raise DataError(f"cannot read {self.path}: {printable(e, 300)}") from e
        columns.check(self.schema, self.path)
        # Types come from the first block; a numeric column whose first block held only integers
        # (or nothing) may hold decimals later: read it as float64 (what the model gets anyway).
        types: dict[str, pa.DataType] = {}
        for c in columns.read:
            t = self.schema.field(c).type
            if c == columns.id_column and c not in columns.features and c != columns.label_column:
                types[c] = pa.string() if pa.types.is_null(t) else t
            elif pa.types.is_integer(t) or pa.types.is_null(t) or pa.types.is_floating(t):
                types[c] = pa.float64()
        convert = pacsv.ConvertOptions(include_columns=columns.read, column_types=types)
        try:
            with pacsv.open_csv(self.path, read_options=pacsv.ReadOptions(block_size=CSV_BLOCK_BYTES),
                                parse_options=self._parse, convert_options=convert) as reader:
                for batch in reader:
                    yield from _slices(batch, batch_rows)
        except pa.ArrowInvalid as e:
            raise DataError(f"{self.path}: {printable(e, 300)}") from e


class ParquetFileSource(Source):
    kind = "parquet"

    def __init__(self, path: Path):
        import pyarrow.parquet as pq

        self.path, self.files = path, [path]
        try:
            # no pre-buffering, 1 MiB buffered reads: memory bounded by one row group's columns
            self._file = pq.ParquetFile(path, pre_buffer=False, buffer_size=PARQUET_BUFFER_BYTES)
        except (pa.ArrowInvalid, OSError) as e:
            raise DataError(f"cannot read {path}: {printable(e, 300)}") from e
        self.schema = self._file.schema_arrow
        self.total_rows = int(self._file.metadata.num_rows)

    def batches(self, columns: Columns, batch_rows: int) -> Generator[pa.RecordBatch, None, None]:
        columns.check(self.schema, self.path)
        try:
            for batch in self._file.iter_batches(batch_size=batch_rows, columns=columns.read):
                yield from _slices(batch, batch_rows)
        except (pa.ArrowInvalid, OSError) as e:
            raise DataError(f"cannot read {self.path}: {printable(e, 300)}") from e


class ParquetDatasetSource(Source):
    """A directory of Parquet files (hive partitions ``key=value/`` become columns), files in
    sorted path order."""

    kind = "dataset"

    def __init__(self, path: Path, files: list[Path]):
        import pyarrow.dataset as pads

        self.path, self.files = path, files
        try:
            self.dataset = pads.dataset([str(f) for f in files], format="parquet", partitioning="hive",
                                        partition_base_dir=str(path))
            self.schema = self.dataset.schema
            self.total_rows = int(self.dataset.count_rows())  # from the files' metadata
        except (pa.ArrowInvalid, OSError) as e:
            raise DataError(f"cannot read the Parquet dataset {path}: {printable(e, 300)}") from e

    def batches(self, columns: Columns, batch_rows: int) -> Generator[pa.RecordBatch, None, None]:
        columns.check(self.schema, self.path)
        try:
            # to_batches yields in dataset (file, then row) order; small read-ahead keeps memory flat
            import pyarrow.dataset as pads

            opts = pads.ParquetFragmentScanOptions(pre_buffer=False, use_buffered_stream=True,
                                                   buffer_size=PARQUET_BUFFER_BYTES)
            for batch in self.dataset.to_batches(columns=columns.read, batch_size=batch_rows, batch_readahead=2,
                                                 fragment_readahead=1, fragment_scan_options=opts):
                yield from _slices(batch, batch_rows)
        except (pa.ArrowInvalid, OSError) as e:
            raise DataError(f"cannot read the Parquet dataset {self.path}: {printable(e, 300)}") from e


class FileSequenceSource(Source):
    """A directory of CSV (and Parquet) files, scored one file after the other."""

    kind = "files"

    def __init__(self, path: Path, files: list[Path]):
        self.path, self.files = path, files
        self._first = _open_file(files[0])
        self.schema = self._first.schema
        self.total_rows = None

    def batches(self, columns: Columns, batch_rows: int) -> Generator[pa.RecordBatch, None, None]:
        for i, f in enumerate(self.files):
            src = self._first if i == 0 else _open_file(f)
            yield from src.batches(columns, batch_rows)


def _open_file(path: Path) -> Source:
    kind = _kind(path)
    if kind == "parquet":
        return ParquetFileSource(path)
    if kind == "csv":
        return CsvSource(path)
    raise DataError(f"{path}: unknown file type; outlierd scores .csv, .csv.gz, .tsv, .parquet and .pq files "
                    "(or a directory of them)")


def data_files(directory: Path) -> list[Path]:
    """The data files under ``directory`` (recursively), sorted by path; hidden (``.``) and
    ``_``-prefixed entries (``_SUCCESS``, ``_metadata``) are skipped."""
    out = []
    for root, dirs, files in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if not d.startswith((".", "_")))
        for f in files:
            p = Path(root) / f
            if not f.startswith((".", "_")) and _kind(p) is not None:
                out.append(p)
    return sorted(out, key=lambda p: p.relative_to(directory).parts)


def open_source(path: str | os.PathLike) -> Source:
    """Open ``path`` for streaming: a CSV or Parquet file, or a directory of them."""
    p = Path(path)
    if p.is_dir():
        files = data_files(p)
        if not files:
            raise DataError(f"input directory {p} holds no .csv, .tsv, .parquet or .pq files")
        if all(_kind(f) == "parquet" for f in files):
            return ParquetDatasetSource(p, files)
        return FileSequenceSource(p, files)
    if not p.is_file():
        raise DataError(f"input {p} does not exist")
    return _open_file(p)


# ------------------------------------------------------------------------------------------------
# Scoring one batch (shared by the local stream and the Dask workers)
# ------------------------------------------------------------------------------------------------


def explain_columns(top_k: int) -> list[pa.Field]:
    fields = []
    for i in range(1, top_k + 1):
        fields += [pa.field(f"top{i}_feature", pa.string()), pa.field(f"top{i}_contribution", pa.float64())]
    return fields


def output_schema(id_field: pa.Field | None, top_k: int | None) -> pa.Schema:
    """``[id], score, anomalous, version[, top1_feature, top1_contribution, ...]``."""
    fields = [] if id_field is None else [id_field]
    fields += [pa.field("score", pa.float64()), pa.field("anomalous", pa.bool_()), pa.field("version", pa.int64())]
    if top_k:
        fields += explain_columns(top_k)
    return pa.schema(fields)


@dataclass(frozen=True)
class BatchScoring:
    """How each batch is scored: which columns, which version, and the explanations asked for."""

    columns: Columns
    version: int
    top_k: int | None = None          # explanations: None for none
    flagged_only: bool = False        # explain only records with score >= threshold
    parallel: bool | None = None      # Model.score's parallel (Dask workers: False, one core each)
    # the threshold in force (the registry's latest threshold version, as a server uses); None: the artifact's
    threshold: float | None = None

    def cut(self, model: Any) -> float:
        """The threshold ``anomalous`` is computed at."""
        return model.threshold if self.threshold is None else self.threshold

    def schema(self, id_field: pa.Field | None) -> pa.Schema:
        return output_schema(id_field, self.top_k)


def score_batch(model: Any, batch: pa.RecordBatch | pa.Table, how: BatchScoring, *, first_row: int = 0,
                where: Any = "input", observe: Callable[[np.ndarray], None] | None = None) -> tuple[pa.RecordBatch, np.ndarray]:
    """Score one batch with ``model``: the output batch (columns of :func:`output_schema`, id not
    cast) and the scores. ``first_row`` (the batch's row number in the whole input) makes error
    messages name the right record. ``observe``: called with the batch's feature matrix (the input
    checks of ``training.input_check``: one vectorised pass per batch)."""
    X = feature_matrix(batch, how.columns.features)
    if observe is not None:
        observe(X)
    try:
        if how.top_k:
            scores, feats, contrib = model.score_explain(X, top_k=how.top_k, flagged_only=how.flagged_only,
                                                           parallel=how.parallel, threshold=how.cut(model))
        else:
            scores = model.score(X, parallel=how.parallel)
    except InvalidInputError as e:
        bad = np.flatnonzero(~np.isfinite(X).all(axis=1))
        if bad.size:  # the kernel names the row inside this batch: name it in the input
            raise InvalidInputError(f"{where}: record {first_row + int(bad[0])} contains NaN or inf (a missing value) "
                                    "and this model's missing-value policy is 'reject'") from e
        raise
    n = X.shape[0]
    arrays: list[pa.Array] = [pa.array(scores, pa.float64()), pa.array(scores >= how.cut(model), pa.bool_()),
                              pa.array(np.full(n, how.version, dtype=np.int64), pa.int64())]
    names = ["score", "anomalous", "version"]
    if how.top_k:
        vocab = pa.array(list(model.feature_names), pa.string())
        for i in range(how.top_k):
            idx = np.asarray(feats[:, i], dtype=np.int64)
            # -1 = not explained: a null name (take with a null index gives null)
            arrays.append(vocab.take(pa.array(idx, mask=idx < 0)))
            arrays.append(pa.array(np.asarray(contrib[:, i], dtype=np.float64), pa.float64()))
            names += [f"top{i + 1}_feature", f"top{i + 1}_contribution"]
    if how.columns.id_column is not None:
        arrays.insert(0, batch.column(how.columns.id_column))
        names.insert(0, how.columns.id_column)
    arrays = [a.combine_chunks() if isinstance(a, pa.ChunkedArray) else a for a in arrays]
    return pa.RecordBatch.from_arrays(arrays, names=names), scores


# ------------------------------------------------------------------------------------------------
# Output and progress
# ------------------------------------------------------------------------------------------------


def check_output(path: str | os.PathLike) -> None:
    """Refuse an output path whose extension says no format we write (before any work is done)."""
    if _kind(Path(path)) is None:
        raise DataError(f"--output {path}: unknown file type; write .parquet, .pq, .csv, .csv.gz or .tsv")


class ScoreWriter:
    """Writes output batches incrementally to ``path`` (.parquet/.pq, or .csv/.csv.gz/.tsv by
    extension) through a temporary file renamed into place by :meth:`close`."""

    def __init__(self, path: str | os.PathLike, schema: pa.Schema):
        self.path = Path(path)
        self.schema = schema
        check_output(self.path)
        kind = _kind(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        if kind == "parquet":
            import pyarrow.parquet as pq

            self._writer: Any = pq.ParquetWriter(self._tmp, schema)
        else:
            import pyarrow.csv as pacsv

            delimiter = "\t" if self.path.name.lower().endswith((".tsv", ".tsv.gz")) else ","
            self._sink = (pa.CompressedOutputStream(str(self._tmp), "gzip") if self.path.name.lower().endswith(".gz")
                          else pa.OSFile(str(self._tmp), "wb"))
            self._writer = pacsv.CSVWriter(self._sink, schema, write_options=pacsv.WriteOptions(delimiter=delimiter))
        self.rows = 0

    def write(self, batch: pa.RecordBatch) -> None:
        if batch.schema != self.schema:
            try:  # e.g. an id column read as int64 from one file and string from the next
                batch = pa.RecordBatch.from_arrays([c.cast(f.type) for c, f in zip(batch.columns, self.schema)],
                                                   schema=self.schema)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
                raise DataError(f"output columns changed type mid-stream ({batch.schema} vs {self.schema}): {e}") from e
        self._writer.write_batch(batch)
        self.rows += batch.num_rows

    def close(self) -> None:
        self._writer.close()
        if hasattr(self, "_sink"):
            self._sink.close()
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        try:
            self._writer.close()
            if hasattr(self, "_sink"):
                self._sink.close()
        except Exception:  # already failing: the original error matters, not this one
            pass
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> ScoreWriter:
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class RowProgress:
    """A progress line on stderr: records done, records/s, percent and a bar when the total is
    known. Redrawn in place on a terminal (at most every 0.2 s); elsewhere (logs, CI) one line
    every few seconds."""

    def __init__(self, total: int | None, *, stream: TextIO | None = None, quiet: bool = False, what: str = "scored"):
        self.total, self.quiet, self.what = total, quiet, what
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = 0.2 if self.tty else 5.0
        self.done = 0
        self.t0 = self._last = time.perf_counter()
        self._shown = False

    def line(self) -> str:
        elapsed = time.perf_counter() - self.t0
        rate = self.done / elapsed if elapsed > 0 else 0.0
        if self.total:
            frac = min(1.0, self.done / self.total)
            bar = "#" * int(frac * 20) + "." * (20 - int(frac * 20))
            return f"{self.what} [{bar}] {self.done:,}/{self.total:,} records ({100 * frac:.1f}%), {rate:,.0f} records/s"
        return f"{self.what} {self.done:,} records, {rate:,.0f} records/s"

    def _show(self, final: bool = False) -> None:
        if self.tty:
            self.stream.write("\r" + self.line() + ("\n" if final else ""))
        else:
            self.stream.write(self.line() + "\n")
        self.stream.flush()
        self._shown = True

    def update(self, rows: int) -> None:
        self.done += rows
        now = time.perf_counter()
        if not self.quiet and now - self._last >= self.interval:
            self._last = now
            self._show()

    def close(self) -> None:
        # a job short enough never to have shown a line stays silent
        if not self.quiet and self._shown:
            self._show(final=True)


@dataclass
class StreamStats:
    rows: int = 0
    anomalies: int = 0
    explained: int = 0
    setup_seconds: float = 0.0     # Dask: starting/reaching the cluster and loading the model on the workers
    scores: list[np.ndarray] = field(default_factory=list)
    labels: list[np.ndarray] = field(default_factory=list)

    def add(self, out: pa.RecordBatch, scores: np.ndarray, flagged_count: int, labels: np.ndarray | None,
            keep_scores: bool, top_k: int | None) -> None:
        self.rows += len(scores)
        self.anomalies += flagged_count
        if top_k:
            self.explained += len(scores) - out.column("top1_feature").null_count
        if keep_scores:
            self.scores.append(np.asarray(scores, dtype=np.float64))
        if labels is not None:
            self.labels.append(labels)


def stream_score(source: Source, model: Any, how: BatchScoring, *, out: str | os.PathLike | None = None,
                 batch_rows: int = DEFAULT_BATCH_ROWS, keep_scores: bool = False,
                 progress: RowProgress | None = None, observe: Callable[[np.ndarray], None] | None = None) -> StreamStats:
    """Score ``source`` batch by batch with ``model``; write the output (if ``out``) as it goes.
    ``observe``: see :func:`score_batch`.

    Reading the next batch and writing the previous output (pyarrow, GIL released) overlap with
    scoring the current one (Numba, GIL released) on two helper threads; at most one batch read
    ahead and ``WRITE_BEHIND`` output batches queued, so memory stays bounded.
    """
    if batch_rows < 1:
        raise InvalidInputError(f"batch_rows must be >= 1; got {batch_rows}")
    from concurrent.futures import ThreadPoolExecutor

    stats = StreamStats()
    writer: ScoreWriter | None = None
    progress = progress or RowProgress(source.total_rows, quiet=True)
    pending: deque[Any] = deque()
    batches = source.batches(how.columns, batch_rows)
    with ThreadPoolExecutor(1, thread_name_prefix="outlierd-read") as reader, \
            ThreadPoolExecutor(1, thread_name_prefix="outlierd-write") as wpool:
        try:
            ahead = reader.submit(next, batches, None)
            while (batch := ahead.result()) is not None:
                ahead = reader.submit(next, batches, None)  # read the next batch while this one is scored
                ob, scores = score_batch(model, batch, how, first_row=stats.rows, where=source.path, observe=observe)
                labels = None
                if how.columns.label_column is not None:
                    labels = label_array(batch, how.columns.label_column, source.path, stats.rows)
                if out is not None:
                    if writer is None:
                        writer = ScoreWriter(out, ob.schema)
                    pending.append(wpool.submit(writer.write, ob))
                    while len(pending) > WRITE_BEHIND:
                        pending.popleft().result()
                stats.add(ob, scores, int(np.count_nonzero(scores >= how.cut(model))), labels,
                          keep_scores or labels is not None, how.top_k)
                progress.update(batch.num_rows)
            while pending:
                pending.popleft().result()
            if out is not None and writer is None:  # no rows at all: an empty file with the right columns
                id_field = source.schema.field(how.columns.id_column) if how.columns.id_column else None
                how.columns.check(source.schema, source.path)
                writer = ScoreWriter(out, how.schema(id_field))
        except BaseException:
            for f in pending:
                f.cancel()
            wpool.shutdown(wait=True)
            if writer is not None:
                writer.abort()
            reader.shutdown(wait=True)  # let a read-ahead finish before closing its generator
            batches.close()
            raise
    if writer is not None:
        writer.close()
    progress.close()
    return stats
