"""Data in: CSV or Parquet through pyarrow, validated with messages that say what to fix."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from outlierd.core.errors import DataError

__all__ = ["DataError", "Dataset", "LABEL_LIKE", "MIN_ROWS", "check_no_label_like", "dataset_from_table",
           "first_non_numeric", "label_like_columns", "load_dataset", "non_numeric_message", "printable", "read_table"]

MIN_ROWS = 2
# column names that usually hold labels, not features (compared case-insensitively, trimmed): a
# file with one of these and no --label-column is refused unless --feature-columns lists it
LABEL_LIKE = ("label", "labels", "is_anomaly", "is_outlier", "anomaly", "outlier", "target", "class")


# cells pyarrow's CSV reader reads as missing in a numeric column (besides an empty cell)
NULL_TOKENS = frozenset({"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN",
                         "N/A", "NA", "NULL", "NaN", "n/a", "nan", "null"})


def printable(text: object, limit: int | None = None) -> str:
    """``text`` safe to echo on a terminal: control and other non-printable characters escaped as
    ``repr`` does (``\\x1b``, ``\\n``), truncated to ``limit`` characters with an ellipsis."""
    s = str(text)
    if limit is not None and len(s) > limit:
        s = s[:limit] + "…"
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in s)


def first_non_numeric(values: pa.ChunkedArray | pa.Array, offset: int = 0) -> tuple[int, str] | None:
    """``(row, text)`` of the first cell of a string column that is neither a number nor a missing
    value (``row`` counted from ``offset``), or None. For error messages: not on a hot path."""
    chunks = values.chunks if isinstance(values, pa.ChunkedArray) else [values]
    row = offset
    for chunk in chunks:
        for cell in chunk.cast(pa.string()).to_pylist():
            if cell is not None and cell.strip() not in NULL_TOKENS:
                try:
                    float(cell)
                except ValueError:
                    return row, cell
            row += 1
    return None


def non_numeric_message(lead: str, row: int, cell: str) -> str:
    """``lead`` (what is wrong with the column), then the first cell that is not a number: its row
    (1-based, the header not counted) and its text (escaped, truncated)."""
    return (f"{lead}: row {row + 1} (counting from 1 after the header) holds '{printable(cell, 40)}', which is not a "
            "number; fix the cell, leave it empty (a missing value), or encode the column as numbers or drop it")


def label_like_columns(names: list[str]) -> list[str]:
    """The names among ``names`` that look like a label column (:data:`LABEL_LIKE`)."""
    return [c for c in names if c.strip().lower() in LABEL_LIKE]


def check_no_label_like(path: str | os.PathLike, features: list[str]) -> None:
    """Refuse (:class:`DataError`) to train on a label-like column picked as a feature by default
    (no ``--label-column`` naming it, no ``--feature-columns`` listing it)."""
    suspects = label_like_columns(features)
    if suspects:
        c = suspects[0]
        raise DataError(f"{path}: column {c!r} looks like a label column and would be trained as a feature; "
                        f"pass --label-column {c} if it holds labels, or list the features explicitly with "
                        f"--feature-columns (it may include {c!r}) if it really is a feature")


@dataclass
class Dataset:
    X: np.ndarray                 # (n, d) float64, NaN where missing
    feature_names: list[str]
    labels: np.ndarray | None     # (n,) int8 in {0, 1}, or None
    path: Path
    warnings: list[str] = field(default_factory=list)

    @property
    def n_rows(self) -> int:
        return int(self.X.shape[0])


def read_table(path: str | os.PathLike) -> pa.Table:
    """Read a CSV (optionally .gz) or Parquet file into an Arrow table."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"data file {p} does not exist")
    name = p.name.lower()
    try:
        if name.endswith((".parquet", ".pq")):
            import pyarrow.parquet as pq

            return pq.read_table(p)
        if name.endswith((".csv", ".csv.gz", ".tsv")):
            import pyarrow.csv as pacsv

            parse = pacsv.ParseOptions(delimiter="\t" if name.endswith(".tsv") else ",")
            return pacsv.read_csv(p, parse_options=parse)
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"cannot read {p}: {printable(e, 300)}") from e
    raise DataError(f"{p}: unknown file type; outlierd reads .csv, .csv.gz, .tsv, .parquet and .pq files")


def _numeric_column(table: pa.Table, name: str, where: object = None) -> np.ndarray:
    col = table.column(name)
    t = col.type
    if pa.types.is_null(t):
        return np.full(len(col), np.nan)
    if not (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t) or pa.types.is_decimal(t)):
        if pa.types.is_string(t) or pa.types.is_large_string(t):
            bad = first_non_numeric(col)
            if bad is not None:
                raise DataError(("" if where is None else f"{where}: ") + non_numeric_message(
                    f"column {name!r} has type {t}; outlierd trains on numeric features only", *bad))
        raise DataError(
            f"column {name!r} has type {t}; outlierd trains on numeric features only: "
            "encode it as numbers or drop it"
        )
    return col.cast(pa.float64()).to_numpy(zero_copy_only=False).astype(np.float64)


def load_dataset(
    path: str | os.PathLike,
    *,
    label_column: str | None = None,
    feature_names: list[str] | None = None,
    require_rows: int = MIN_ROWS,
) -> Dataset:
    """Load ``path`` and validate it: numeric features, labels in {0, 1}, enough rows, no column
    entirely missing. ``feature_names`` (for scoring) selects and orders the columns a model
    expects. Missing values are kept as NaN; constant columns and missing values are reported in
    ``warnings``.
    """
    return dataset_from_table(read_table(path), path, label_column=label_column, feature_names=feature_names,
                              require_rows=require_rows)


def dataset_from_table(
    table: pa.Table,
    path: str | os.PathLike,
    *,
    label_column: str | None = None,
    feature_names: list[str] | None = None,
    require_rows: int = MIN_ROWS,
) -> Dataset:
    """:func:`load_dataset` on a table already read from ``path`` (named in messages), so a caller
    that needs other columns of the same file reads it once."""
    columns = list(table.column_names)
    if len(set(columns)) != len(columns):
        dupes = sorted({c for c in columns if columns.count(c) > 1})
        raise DataError(f"{path}: duplicate column names {dupes}")
    if label_column is not None and label_column not in columns:
        raise DataError(f"{path}: label column {label_column!r} not found; columns are {columns[:20]}")
    if feature_names is None:
        feature_names = [c for c in columns if c != label_column]
    else:
        missing = [c for c in feature_names if c not in columns]
        if missing:
            raise DataError(f"{path}: the model's feature columns {missing[:10]} are missing from the data")
    if not feature_names:
        raise DataError(f"{path}: no feature columns (columns: {columns})")
    n = table.num_rows
    if n < require_rows:
        raise DataError(f"{path}: {n} rows; at least {require_rows} are needed")
    X = np.empty((n, len(feature_names)), dtype=np.float64)
    for j, name in enumerate(feature_names):
        X[:, j] = _numeric_column(table, name, path)
    warnings: list[str] = []
    finite = np.isfinite(X)
    missing_counts = (~finite).sum(axis=0)
    empty = [feature_names[j] for j in np.flatnonzero(missing_counts == n)]
    if empty and require_rows > 0:
        raise DataError(f"{path}: columns {empty[:10]} have no finite values at all; drop them")
    for j in np.flatnonzero(missing_counts).tolist():
        warnings.append(f"column {feature_names[j]!r}: {missing_counts[j]} missing or non-finite values (imputed with the median)")
    if n:
        with np.errstate(all="ignore"):
            lo = np.where(finite, X, np.inf).min(axis=0)
            hi = np.where(finite, X, -np.inf).max(axis=0)
        for j in np.flatnonzero(lo == hi).tolist():
            warnings.append(f"column {feature_names[j]!r} is constant ({lo[j]:g}); it carries no signal")
    labels = None
    if label_column is not None:
        raw = table.column(label_column)
        if raw.null_count:
            raise DataError(f"{path}: label column {label_column!r} has {raw.null_count} missing values")
        lab = _numeric_column(table, label_column)
        bad = ~np.isin(lab, (0.0, 1.0))
        if bad.any():
            examples = sorted(set(lab[bad].tolist()))[:5]
            raise DataError(f"{path}: label column {label_column!r} must hold 0 (normal) or 1 (anomaly); found {examples}")
        labels = lab.astype(np.int8)
    return Dataset(X, list(feature_names), labels, Path(path), warnings)
