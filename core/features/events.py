"""Raw event batches: an Arrow table (or anything ``pyarrow.table`` takes) decoded into the typed
columns the kernel needs, with errors that name the column and the row.

Entity keys and category values are read as text (an integer key 42 and the text "42" are the same
entity) and identified by a 64-bit hash of that text; only each batch's distinct values are hashed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..errors import InvalidInputError
from .spec import FeatureSpec

_SEP = "\x1f"  # joins the columns of a composite entity key


class EventError(InvalidInputError):
    """A raw event is unusable: the message names the column and the row."""


@dataclass
class Categories:
    """One text column of a batch as (distinct values, index of each row's value)."""

    values: list[str]
    codes: np.ndarray  # int32, one per row

    def hashes(self) -> np.ndarray:
        """int64 hash of every row's value."""
        return hash_text(self.values)[self.codes]


@dataclass
class EventBatch:
    n: int
    entity: np.ndarray  # int64 hash of the entity key
    time: np.ndarray  # float64 epoch seconds
    numeric: dict[str, np.ndarray]  # float64 columns
    categories: dict[str, Categories]
    geo: tuple[np.ndarray, np.ndarray] | None


def hash_text(values: list[str]) -> np.ndarray:
    """Stable 64-bit hashes (BLAKE2b, 8 bytes: the same in every process and on every machine)."""
    digest = b"".join(hashlib.blake2b(v.encode("utf-8", "surrogatepass"), digest_size=8).digest() for v in values)
    return np.frombuffer(digest, dtype="<i8").astype(np.int64)


def as_table(events: Any) -> pa.Table:
    """``events`` as an Arrow table (a table, a record batch, a pandas frame or a dict of columns)."""
    if isinstance(events, pa.Table):
        return events
    if isinstance(events, pa.RecordBatch):
        return pa.Table.from_batches([events])
    try:
        if hasattr(events, "to_dict") and hasattr(events, "columns"):  # a pandas frame
            return pa.Table.from_pandas(events, preserve_index=False)
        return pa.table(events)
    except (pa.ArrowException, TypeError, ValueError) as e:
        raise EventError(f"events must be a table of typed columns: {e}") from e


def _get(table: pa.Table, name: str, offset: int) -> pa.ChunkedArray:
    if name not in table.column_names:
        raise EventError(f"column {name!r} is missing (the events have {', '.join(map(repr, table.column_names)) or 'no columns'})")
    return table.column(name)


def _first(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


def _row_value(col: pa.ChunkedArray, row: int) -> str:
    text = repr(col[row].as_py())
    return text if len(text) <= 64 else text[:64] + "…"


def numeric_column(table: pa.Table, name: str, offset: int = 0, allow_null: bool = False) -> np.ndarray:
    """A float64 copy of a numeric column; text is refused naming the first row that is not a number."""
    col = _get(table, name, offset)
    t = col.type
    if not (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t) or pa.types.is_decimal(t)):
        if pa.types.is_string(t) or pa.types.is_large_string(t):
            try:
                values = col.cast(pa.float64()).to_numpy(zero_copy_only=False)
            except pa.ArrowException:
                for row, cell in enumerate(col.to_pylist()):
                    try:
                        float(cell) if cell is not None else None
                    except ValueError:
                        raise EventError(f"column {name!r} row {row + offset}: {_row_value(col, row)} is not a number") from None
                raise
        else:
            raise EventError(f"column {name!r} must be numeric; got Arrow type {t}")
    else:
        values = col.cast(pa.float64()).to_numpy(zero_copy_only=False)
    if not allow_null and col.null_count:
        row = _first(col.is_null().to_numpy(zero_copy_only=False))
        raise EventError(f"column {name!r} row {row + offset}: missing value (null)")
    return np.ascontiguousarray(values, dtype=np.float64)


def time_column(table: pa.Table, name: str, offset: int = 0) -> np.ndarray:
    """Event time as float64 epoch seconds: numbers (seconds), Arrow timestamps, or ISO-8601 text
    (without an offset: UTC)."""
    col = _get(table, name, offset)
    t = col.type
    if col.null_count:
        row = _first(col.is_null().to_numpy(zero_copy_only=False))
        raise EventError(f"column {name!r} row {row + offset}: missing event time (null)")
    if pa.types.is_timestamp(t):
        ns = col.cast(pa.timestamp("ns", tz=t.tz)).cast(pa.int64()).to_numpy(zero_copy_only=False)
        return ns.astype(np.float64) / 1e9
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        try:
            return _iso_seconds(col)
        except pa.ArrowException:
            pass
        # mixed forms (with and without a zone), or a bad cell: row by row, naming the first bad one
        out = np.empty(len(col))
        for row in range(len(col)):
            try:
                out[row] = _iso_seconds(col.slice(row, 1))[0]
            except pa.ArrowException:
                raise EventError(f"column {name!r} row {row + offset}: cannot parse event time {_row_value(col, row)} "
                                 "(epoch seconds or ISO-8601 text, e.g. 2024-05-01T12:00:00Z)") from None
        return out
    values = numeric_column(table, name, offset)
    bad = ~np.isfinite(values)
    if bad.any():
        row = _first(bad)
        raise EventError(f"column {name!r} row {row + offset}: event time must be finite epoch seconds; got {values[row]}")
    return values


def _iso_seconds(col: pa.ChunkedArray) -> np.ndarray:
    try:  # with a zone offset ("Z", "+02:00")
        ts = col.cast(pa.timestamp("ns", tz="UTC"))
    except pa.ArrowException:  # without one: UTC
        ts = col.cast(pa.timestamp("ns"))
    return ts.cast(pa.int64()).to_numpy(zero_copy_only=False).astype(np.float64) / 1e9


def _text(col: pa.ChunkedArray) -> pa.ChunkedArray:
    return col if pa.types.is_string(col.type) else col.cast(pa.string())


def text_column(table: pa.Table, name: str, offset: int = 0, missing: str | None = None) -> Categories:
    """A column read as text, dictionary-encoded. Nulls: refused (``missing`` None) or read as ``missing``."""
    col = _get(table, name, offset)
    if col.null_count:
        if missing is None:
            row = _first(col.is_null().to_numpy(zero_copy_only=False))
            raise EventError(f"column {name!r} row {row + offset}: missing value (null)")
        col = col.fill_null(missing) if pa.types.is_string(col.type) else _text(col).fill_null(missing)
    try:
        encoded = pc.dictionary_encode(_text(col)).combine_chunks()
    except pa.ArrowException as e:
        raise EventError(f"column {name!r} cannot be read as text: {e}") from e
    return Categories(encoded.dictionary.to_pylist(), encoded.indices.to_numpy(zero_copy_only=False).astype(np.int32))


def entity_column(table: pa.Table, spec: FeatureSpec, offset: int = 0) -> np.ndarray:
    """int64 hash of each row's entity key (the key columns' text joined)."""
    if len(spec.entity) == 1:
        cats = text_column(table, spec.entity[0], offset)
    else:
        for name in spec.entity:
            col = _get(table, name, offset)
            if col.null_count:
                row = _first(col.is_null().to_numpy(zero_copy_only=False))
                raise EventError(f"column {name!r} row {row + offset}: missing entity key (null)")
        joined = pc.binary_join_element_wise(*[_text(table.column(c)) for c in spec.entity], _SEP)
        cats = text_column(pa.table({"key": joined}), "key", offset)
    return cats.hashes()


def decode_events(events: Any, spec: FeatureSpec, offset: int = 0) -> EventBatch:
    """Decode a batch for ``spec``: every column it uses checked (missing key, unparseable time,
    wrong type: :class:`EventError` naming the column and the row, counted from ``offset``)."""
    table = as_table(events)
    n = table.num_rows
    for name in spec.entity:
        _get(table, name, offset)
    try:
        entity = entity_column(table, spec, offset)
    except EventError as e:
        raise EventError(e.message.replace("missing value", "missing entity key")) from None
    time = time_column(table, spec.time, offset)
    numeric: dict[str, np.ndarray] = {}
    categories: dict[str, Categories] = {}
    for f in spec.features:
        if f.kind == "numeric" and f.column[0] not in numeric:
            numeric[f.column[0]] = numeric_column(table, f.column[0], offset, allow_null=True)
    for col in spec.value_columns:
        numeric[col] = numeric_column(table, col, offset)
    for f in spec.features:
        if f.kind in ("category", "new_for_entity") or (f.kind == "window" and f.agg == "distinct"):
            if f.column[0] not in categories:
                categories[f.column[0]] = text_column(table, f.column[0], offset, missing="")
    geo = None
    if spec.geo_columns is not None:
        lat, lon = (numeric_column(table, c, offset) for c in spec.geo_columns)
        for c, v, lim in ((spec.geo_columns[0], lat, 90.0), (spec.geo_columns[1], lon, 180.0)):
            bad = ~(np.abs(v) <= lim)
            if bad.any():
                row = _first(bad)
                raise EventError(f"column {c!r} row {row + offset}: {v[row]} is outside [-{lim:g}, {lim:g}] degrees")
        geo = (lat, lon)
    return EventBatch(n, entity, time, numeric, categories, geo)
