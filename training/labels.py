"""Labels for training: reviewers' labels from a (partially) labelled column of the data file and
from labelled records handed in by the caller (the CLI reads them from the feedback store), joined
into one labelled training set with its provenance. Labels are int8: 1 anomaly, 0 normal, -1
unlabelled."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from outlierd.core.errors import DataError
from outlierd.core.labels import ANOMALY_WORDS, NORMAL_WORDS, UNLABELLED_WORDS

from .data import dataset_from_table, read_table


@dataclass(frozen=True, eq=False)
class LabelledRecords:
    """Records reviewers labelled, read by the caller (e.g. the CLI, from the feedback store): the
    features in the model's order, their labels and record ids, and where they came from."""

    X: np.ndarray                 # (n, d) features
    y: np.ndarray                 # (n,) 1 anomaly, 0 normal
    ids: tuple[str, ...]
    source: Path | str            # the store they were read from (lineage and messages): a file, or a database URL (no password)

    def __post_init__(self) -> None:
        X = np.asarray(self.X, dtype=np.float64)
        if X.size == 0:
            X = X.reshape(0, X.shape[1] if X.ndim == 2 else 0)
        y = np.asarray(self.y, dtype=np.int8)
        if X.ndim != 2 or y.shape != (X.shape[0],) or len(self.ids) != X.shape[0]:
            raise DataError(f"labelled records from {self.source}: X must be (n, d) with n labels and n ids; got "
                            f"X {X.shape}, {y.shape[0] if y.ndim else 0} labels, {len(self.ids)} ids")
        if not np.all((y == 0) | (y == 1)):
            raise DataError(f"labelled records from {self.source}: labels must be 0 (normal) or 1 (anomaly); "
                            f"found {sorted(set(y.tolist()) - {0, 1})[:5]}")
        object.__setattr__(self, "X", X)
        object.__setattr__(self, "y", y)
        object.__setattr__(self, "ids", tuple(str(i) for i in self.ids))
        if "://" not in str(self.source):  # a database URL stays one (a Path would fold its //)
            object.__setattr__(self, "source", Path(self.source))


def parse_labels(column: pa.ChunkedArray | pa.Array, name: str, source: str = "data") -> np.ndarray:
    """Labels from a table column: int8, 1 = anomaly, 0 = normal, -1 = unlabelled (an empty cell,
    null or NaN). Accepts 0/1 numbers, booleans, and the words 0/1/true/false/anomaly/normal in any
    case. Anything else is a :class:`DataError` naming the column and the values found."""
    t = column.type
    hint = ("(true/false and anomaly/normal are accepted too; leave a cell empty for an unlabelled record)")
    if pa.types.is_null(t):
        return np.full(len(column), -1, dtype=np.int8)
    if pa.types.is_boolean(t):
        v = column.to_numpy(zero_copy_only=False)
        return np.array([-1 if x is None else int(bool(x)) for x in v], dtype=np.int8)
    if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t):
        v = column.cast(pa.float64()).to_numpy(zero_copy_only=False).astype(np.float64)
        out = np.full(v.shape, -1, dtype=np.int8)
        known = ~np.isnan(v)
        bad = known & ~np.isin(v, (0.0, 1.0))
        if bad.any():
            examples = sorted(set(v[bad].tolist()))[:5]
            raise DataError(f"{source}: label column {name!r} must hold 0 (normal) or 1 (anomaly); found {examples} {hint}")
        out[known] = v[known].astype(np.int8)
        return out
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_dictionary(t):
        raw = column.cast(pa.string()).to_pylist()
        out = np.full(len(raw), -1, dtype=np.int8)
        unknown: set[str] = set()
        for i, s in enumerate(raw):
            w = "" if s is None else s.strip().lower()
            if w in UNLABELLED_WORDS:
                continue
            if w in ANOMALY_WORDS:
                out[i] = 1
            elif w in NORMAL_WORDS:
                out[i] = 0
            else:
                unknown.add(s)
        if unknown:
            raise DataError(f"{source}: label column {name!r} must hold 0 (normal) or 1 (anomaly); found {sorted(unknown)[:5]} {hint}")
        return out
    raise DataError(f"{source}: label column {name!r} has type {t}; labels must be 0/1, true/false or anomaly/normal")


def read_label_column(data: str | os.PathLike, label_column: str) -> np.ndarray:
    """The parsed labels (-1 unlabelled, 0, 1) of ``label_column`` in ``data``."""
    table = read_table(data)
    if label_column not in table.column_names:
        raise DataError(f"{data}: label column {label_column!r} not found; columns are {list(table.column_names)[:20]}")
    return parse_labels(table.column(label_column), label_column, str(data))


def fingerprint(keys: Sequence[str], labels: np.ndarray) -> str:
    """sha256 of a label set: its sorted (key, label) pairs as canonical JSON. Same labels on the
    same records -> same fingerprint, whatever their order."""
    pairs = sorted((str(k), int(v)) for k, v in zip(keys, labels) if v >= 0)
    return hashlib.sha256(json.dumps(pairs, separators=(",", ":")).encode()).hexdigest()


@dataclass
class LabelledData:
    X: np.ndarray                 # (n, d) float64: the file's rows, then the feedback records
    feature_names: list[str]
    y: np.ndarray                 # (n,) int8: 1 anomaly, 0 normal, -1 unlabelled
    n_file_rows: int
    provenance: dict[str, Any]
    warnings: list[str] = field(default_factory=list)

    @property
    def anomalies(self) -> int:
        return int(np.sum(self.y == 1))

    @property
    def normals(self) -> int:
        return int(np.sum(self.y == 0))


def _check_feedback_schema(registry: str | os.PathLike | None, model: str | None, names: list[str], width: int, store: Path | str) -> None:
    if width != len(names):
        raise DataError(f"feedback store {store}: captured records of {model!r} have {width} features; "
                        f"the training data has {len(names)}")
    if registry is None or model is None:
        return
    from outlierd.core.artifact import read_manifest
    from outlierd.core.registry import Registry

    try:
        reg = Registry(registry)
        versions = reg.versions(model)
        served = [f["name"] for f in read_manifest(reg.path(model, versions[-1]["version"]))["features"]] if versions else None
    except Exception:  # no such model yet, unreadable manifest: nothing to compare with
        return
    if served is not None and served != names:
        raise DataError(f"feedback store {store}: {model!r} was served with features {served[:5]}…, "
                        f"the training data has {names[:5]}…; captured records cannot be appended")


def labelled_data(
    table: pa.Table,
    data: str | os.PathLike,
    label_column: str | None = None,
    *,
    feedback: LabelledRecords | None = None,
    model: str | None = None,
    registry: str | os.PathLike | None = None,
    feature_names: Sequence[str] | None = None,
) -> LabelledData:
    """The training rows of ``table`` (read from ``data``) with their labels (``label_column``:
    partial labels allowed), plus the ``feedback`` records of ``model`` that reviewers labelled
    (appended after the file's rows, features in the model's order). ``feature_names``: the
    feature columns, in order (default: every column but the label column)."""
    labels = None
    names = None if feature_names is None else list(feature_names)
    if label_column is not None:
        if label_column not in table.column_names:
            raise DataError(f"{data}: label column {label_column!r} not found; columns are {list(table.column_names)[:20]}")
        labels = parse_labels(table.column(label_column), label_column, str(data))
        if names is None:
            names = [c for c in table.column_names if c != label_column]
    ds = dataset_from_table(table, data, feature_names=names)
    n = ds.n_rows
    y = labels if labels is not None else np.full(n, -1, dtype=np.int8)
    X = ds.X
    sources: list[dict[str, Any]] = []
    if label_column is not None:
        sources.append({"source": "column", "column": label_column, "anomalies": int(np.sum(y == 1)),
                        "normals": int(np.sum(y == 0)), "sha256": fingerprint([f"row:{i}" for i in range(n)], y)})
    warnings = list(ds.warnings)
    if feedback is not None:
        store, Xf, yf, ids = feedback.source, feedback.X, feedback.y, feedback.ids
        if len(ids):
            _check_feedback_schema(registry, model, ds.feature_names, Xf.shape[1], store)
            X = np.vstack([X, Xf])
            y = np.concatenate([y, yf])
        else:
            warnings.append(f"feedback store {store} holds no labelled captured records of {model!r}")
        sources.append({"source": "feedback", "store": store if isinstance(store, str) else str(store.resolve()), "model": model, "records": len(ids),
                        "anomalies": int(np.sum(yf == 1)), "normals": int(np.sum(yf == 0)), "sha256": fingerprint(ids, yf)})
    provenance = {"anomalies": int(np.sum(y == 1)), "normals": int(np.sum(y == 0)), "unlabelled": int(np.sum(y < 0)),
                  "label_column": label_column, "sources": sources,
                  "sha256": hashlib.sha256("".join(s["sha256"] for s in sources).encode()).hexdigest()}
    return LabelledData(X, ds.feature_names, y, n, provenance, warnings)


def load_labelled_data(data: str | os.PathLike, label_column: str | None = None, **kwargs: Any) -> LabelledData:
    """:func:`labelled_data` of the file ``data``."""
    return labelled_data(read_table(data), data, label_column, **kwargs)
