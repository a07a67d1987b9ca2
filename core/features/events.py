"""Raw event batches: an Arrow table (or anything ``pyarrow.table`` takes) decoded into the typed
columns the kernel needs, with errors that name the column and the row.

Entity keys and category values are read as text (an integer key 42 and the text "42" are the same
entity) and identified by a 64-bit hash of that text's UTF-8 bytes (FNV-1a with a SplitMix64
finaliser, computed in Numba straight from the Arrow string buffers: the same in every process).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numba as nb
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
    """One text column of a batch: the 64-bit hash of every row's value, and (before any reordering)
    the column itself, for training to learn the values."""

    row_hashes: np.ndarray  # int64, one per row
    column: pa.ChunkedArray | None = None

    def hashes(self) -> np.ndarray:
        return self.row_hashes

    def value_counts(self) -> tuple[list[str], np.ndarray]:
        """Distinct values and how many rows hold each (training only)."""
        assert self.column is not None
        encoded = pc.dictionary_encode(self.column).combine_chunks()
        values = encoded.dictionary.to_pylist()
        return values, np.bincount(encoded.indices.to_numpy(zero_copy_only=False), minlength=len(values))


@dataclass
class EventBatch:
    n: int
    entity: np.ndarray  # int64 hash of the entity key
    time: np.ndarray  # float64 epoch seconds
    numeric: dict[str, np.ndarray]  # float64 columns
    categories: dict[str, Categories]
    geo: tuple[np.ndarray, np.ndarray] | None


@nb.njit(cache=True)  # keeps the GIL: microseconds a column (core/features/kernel.py)
def _fnv_rows(offsets, data, first, n, out):
    for i in range(n):
        h = np.uint64(14695981039346656037)
        for j in range(offsets[first + i], offsets[first + i + 1]):
            h ^= np.uint64(data[j])
            h *= np.uint64(1099511628211)
        h ^= h >> np.uint64(30)
        h *= np.uint64(0xBF58476D1CE4E5B9)
        h ^= h >> np.uint64(27)
        h *= np.uint64(0x94D049BB133111EB)
        h ^= h >> np.uint64(31)
        out[i] = h


def row_hashes(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """int64 hash of every value of a string column without nulls."""
    if isinstance(col, pa.ChunkedArray):
        chunks = col.chunks if col.num_chunks != 1 else [col.chunk(0)]
    else:
        chunks = [col]
    out = np.empty(len(col), dtype=np.uint64)
    at = 0
    for chunk in chunks:
        n = len(chunk)
        if n == 0:
            continue
        _, offsets, data = chunk.buffers()
        off = np.frombuffer(offsets, dtype=np.int32)
        raw = np.frombuffer(data, dtype=np.uint8) if data is not None else np.empty(0, dtype=np.uint8)
        _fnv_rows(off, raw, chunk.offset, n, out[at:at + n])
        at += n
    return out.view(np.int64)


def hash_text(values: list[str]) -> np.ndarray:
    """int64 hashes of ``values`` (as :func:`row_hashes` gives them)."""
    return row_hashes(pa.array(values, type=pa.string()))


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
    try:
        return table.column(name)
    except KeyError:
        raise EventError(f"column {name!r} is missing (the events have {', '.join(map(repr, table.column_names)) or 'no columns'})") from None


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
    elif pa.types.is_float64(t) and col.num_chunks == 1 and not col.null_count:
        return col.chunk(0).to_numpy()  # zero-copy, read-only: the kernel only reads it
    else:
        values = col.cast(pa.float64()).to_numpy(zero_copy_only=False)
    if not allow_null and col.null_count:
        row = _first(col.is_null().to_numpy(zero_copy_only=False))
        raise EventError(f"column {name!r} row {row + offset}: missing value (null)")
    return np.asarray(values, dtype=np.float64)


def time_column(table: pa.Table, name: str, offset: int = 0) -> np.ndarray:
    """Event time as float64 epoch seconds: numbers (seconds), Arrow timestamps, or ISO-8601 text
    (without an offset: UTC)."""
    col = _get(table, name, offset)
    t = col.type
    if col.null_count:
        row = _first(col.is_null().to_numpy(zero_copy_only=False))
        raise EventError(f"column {name!r} row {row + offset}: missing event time (null)")
    if t == pa.float64() and col.num_chunks == 1:  # the common case: epoch seconds, one chunk, no nulls (checked above)
        values = col.chunk(0).to_numpy()
        if not np.isfinite(values).all():
            row = _first(~np.isfinite(values))
            raise EventError(f"column {name!r} row {row + offset}: event time must be finite epoch seconds; got {values[row]}")
        return values
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
    if pa.types.is_string(col.type):
        return col
    if pa.types.is_dictionary(col.type):
        col = col.cast(col.type.value_type)
    return col.cast(pa.string())


def text_column(table: pa.Table, name: str, offset: int = 0, missing: str | None = None) -> Categories:
    """A column read as text, hashed. Nulls: refused (``missing`` None) or read as ``missing``."""
    col = _get(table, name, offset)
    if col.null_count:
        if missing is None:
            row = _first(col.is_null().to_numpy(zero_copy_only=False))
            raise EventError(f"column {name!r} row {row + offset}: missing value (null)")
        col = col.fill_null(missing) if pa.types.is_string(col.type) else _text(col).fill_null(missing)
    try:
        text = _text(col)
    except pa.ArrowException as e:
        raise EventError(f"column {name!r} cannot be read as text: {e}") from e
    return Categories(row_hashes(text), text)


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
    for col in spec.value_columns:  # nulls refused: first, so that a column both kinds use is read once
        numeric[col] = numeric_column(table, col, offset)
    for f in spec.features:
        if f.kind == "numeric" and f.column[0] not in numeric:
            numeric[f.column[0]] = numeric_column(table, f.column[0], offset, allow_null=True)
    for f in spec.features:
        if f.kind in ("category", "new_for_entity") or (f.kind == "window" and f.agg == "distinct"):
            if f.column[0] not in categories:
                categories[f.column[0]] = text_column(table, f.column[0], offset, missing="")
    geo = None
    if spec.geo_columns is not None:
        lat, lon = (numeric_column(table, c, offset) for c in spec.geo_columns)
        for c, v, lim in ((spec.geo_columns[0], lat, 90.0), (spec.geo_columns[1], lon, 180.0)):
            if not (np.abs(v) <= lim).all():
                row = _first(~(np.abs(v) <= lim))
                raise EventError(f"column {c!r} row {row + offset}: {v[row]} is outside [-{lim:g}, {lim:g}] degrees")
        geo = (lat, lon)
    return EventBatch(n, entity, time, numeric, categories, geo)
