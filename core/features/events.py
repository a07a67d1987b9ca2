"""Raw event batches: an Arrow table (or anything ``pyarrow.table`` takes) decoded into the typed
columns the kernel needs, with errors that name the column and the row.

Entity keys and category values are read as text (an integer key 42 and the text "42" are the same
entity) and identified by a 64-bit hash of that text's UTF-8 bytes (FNV-1a with a SplitMix64
finaliser, computed in Numba straight from the Arrow string buffers: the same in every process).
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Any

import numba as nb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..errors import InvalidInputError
from .spec import FeatureSpec

_SEP = "\x1f"  # joins the columns of a composite entity key
_READ_OPTIONS = pa.ipc.IpcReadOptions(use_threads=False)  # one small batch a message: Arrow's pool would only add hand-offs


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


@nb.njit(cache=True)
def _fnv_checked(offsets, data, first, n, out):
    """:func:`_fnv_rows` of a column read from a message, after checking that its offsets stay
    inside the data (False: they do not, nothing hashed)."""
    if first < 0 or first + n >= offsets.shape[0] or offsets[first] < 0 or offsets[first + n] > data.shape[0]:
        return False
    for i in range(first, first + n):
        if offsets[i + 1] < offsets[i]:
            return False
    _fnv_rows(offsets, data, first, n, out)
    return True


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


_EOS = b"\xff\xff\xff\xff\x00\x00\x00\x00"  # an IPC stream's end-of-stream marker
_U32, _I32, _U16, _I64 = (struct.Struct(f) for f in ("<I", "<i", "<H", "<q"))


@nb.njit(cache=True)
def _bad_row(time, lat, lon):
    """The first row whose event time is not finite or whose place is out of range (-1: none)."""
    for i in range(time.shape[0]):
        if not math.isfinite(time[i]):
            return i
    for i in range(lat.shape[0]):
        if not (abs(lat[i]) <= 90.0 and abs(lon[i]) <= 180.0):
            return i
    return -1


def _buffers_of(t: pa.DataType) -> int | None:
    """How many IPC buffers a top-level column of type ``t`` has (None: a layout not read here)."""
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return 3
    if (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t) or pa.types.is_temporal(t)
            or pa.types.is_decimal(t) or pa.types.is_fixed_size_binary(t)):
        return 2
    return None


class _Table:
    """Reads a flatbuffers table (the Arrow IPC message metadata): fields by their index."""

    __slots__ = ("buf", "pos", "vt", "vt_size")

    def __init__(self, buf: bytes, pos: int) -> None:
        self.buf, self.pos = buf, pos
        self.vt = pos - _I32.unpack_from(buf, pos)[0]
        self.vt_size = _U16.unpack_from(buf, self.vt)[0]

    def field(self, i: int) -> int:
        """The field's position in the buffer (0: absent)."""
        at = 4 + 2 * i
        if at >= self.vt_size:
            return 0
        off = _U16.unpack_from(self.buf, self.vt + at)[0]
        return self.pos + off if off else 0

    def ref(self, i: int) -> int:
        """Where an offset field (a table or a vector) points (0: absent)."""
        at = self.field(i)
        return at + _U32.unpack_from(self.buf, at)[0] if at else 0


class RawMessage:
    """One record batch of a served message, located in its bytes but not read into Arrow objects:
    per column ``(length, null_count)`` and the ``(start, length)`` of its buffers in ``data``."""

    __slots__ = ("data", "num_rows", "nodes", "buffers", "schema")

    def __init__(self, data: bytes, num_rows: int, nodes: list[tuple[int, int]], buffers: list[tuple[int, int]],
                 schema: pa.Schema) -> None:
        self.data, self.num_rows, self.nodes, self.buffers, self.schema = data, num_rows, nodes, buffers, schema

    def table(self) -> pa.Table:
        """The message as an Arrow table (read by Arrow: for the general path and for routing)."""
        with pa.ipc.open_stream(pa.py_buffer(self.data), options=_READ_OPTIONS) as reader:
            return reader.read_all()


class MessageDecoder:
    """Served messages (Arrow IPC streams) -> :class:`EventBatch` for one spec, with the per-message
    work of the common case cut to a few reads of the message's metadata: a stream of one record
    batch, without compression, whose schema was seen before (its schema message is compared byte
    for byte and parsed once) and whose columns are all flat, with the columns the spec uses plain
    (text as ``utf8``, numbers and times as ``float64``) and without nulls. Their values are read in
    place from the message's bytes (no Arrow objects, no copy of the numbers), and text is hashed
    from its buffers as :func:`row_hashes` does. Anything else (other types, nulls, several
    batches, dictionaries, compression, a bad value) takes the general path (Arrow's reader,
    validated, and :func:`decode_events`), which gives the same batch or the error naming the
    column and the row."""

    def __init__(self, spec: FeatureSpec) -> None:
        self.spec = spec
        self._prefix: bytes | None = None  # the last schema message seen, as sent
        self._schema: pa.Schema | None = None
        self._buffers = 0  # IPC buffers of a record batch of that schema (0: not read here)
        # per column the spec uses: (name, node index, first buffer index), for that schema; None: the general path
        self._plan: dict[str, tuple[int, int]] | None = None

    def read(self, data: bytes) -> RawMessage | pa.Table:
        """The events of one message, located (the common case) or read by Arrow. Raises
        ``pa.ArrowException`` or ``OSError`` when ``data`` is not an Arrow IPC stream."""
        prefix = self._prefix
        if prefix is not None and self._buffers and data.startswith(prefix):
            try:
                found = self._locate(data, len(prefix))
            except (struct.error, IndexError):
                found = None  # the general reader says what is wrong
            if found is not None:
                return found
        with pa.ipc.open_stream(pa.py_buffer(data), options=_READ_OPTIONS) as reader:
            table = reader.read_all()
        table.validate(full=True)  # offsets inside their data: the kernels read the buffers unchecked
        if self._schema is None or not table.schema.equals(self._schema):
            source = pa.BufferReader(data)
            pa.ipc.read_message(source)  # the schema message
            self._prefix, self._schema = data[:source.tell()], table.schema
            self._plan, self._buffers = self._plan_for(table.schema)
        return table

    def _locate(self, data: bytes, at: int) -> RawMessage | None:
        """The record batch message at ``at`` (None: not one this reads; the general path then)."""
        if _U32.unpack_from(data, at)[0] != 0xFFFFFFFF:
            return None
        size = _I32.unpack_from(data, at + 4)[0]
        meta = at + 8
        body = meta + size
        if size <= 0 or body > len(data):
            return None
        m = bytes(data[meta:body])  # the metadata (a few hundred bytes) on its own: offsets from 0
        msg = _Table(m, _U32.unpack_from(m, 0)[0])
        version = msg.field(0)
        if not version or _U16.unpack_from(m, version)[0] not in (3, 4) or not msg.field(1) or m[msg.field(1)] != 3:
            return None  # not a V4/V5 record batch
        length_at = msg.field(3)
        body_len = _I64.unpack_from(m, length_at)[0] if length_at else 0
        rest = data[body + body_len:]
        if body_len < 0 or body + body_len > len(data) or (rest and rest != _EOS):
            return None  # several batches, dictionaries, or short: Arrow's reader
        rb = _Table(m, msg.ref(2))
        if rb.field(3) or (rb.field(4) and _U32.unpack_from(m, rb.ref(4))[0]):
            return None  # compressed, or variadic buffers
        n = _I64.unpack_from(m, rb.field(0))[0] if rb.field(0) else 0
        nodes_at, bufs_at = rb.ref(1), rb.ref(2)
        n_nodes, n_bufs = _U32.unpack_from(m, nodes_at)[0], _U32.unpack_from(m, bufs_at)[0]
        if n_nodes != len(self._schema.names) or n_bufs != self._buffers:  # type: ignore[union-attr]
            return None
        nodes = [(_I64.unpack_from(m, nodes_at + 4 + 16 * j)[0], _I64.unpack_from(m, nodes_at + 12 + 16 * j)[0]) for j in range(n_nodes)]
        buffers = []
        for j in range(n_bufs):
            off, length = _I64.unpack_from(m, bufs_at + 4 + 16 * j)[0], _I64.unpack_from(m, bufs_at + 12 + 16 * j)[0]
            if off < 0 or length < 0 or off + length > body_len:
                return None
            buffers.append((body + off, length))
        if any(length != n for length, _ in nodes):
            return None
        return RawMessage(data, n, nodes, buffers, self._schema)

    def _plan_for(self, schema: pa.Schema) -> tuple[dict[str, tuple[int, int]] | None, int]:
        counts = [_buffers_of(f.type) for f in schema]
        if any(c is None for c in counts):
            return None, 0
        first = np.cumsum([0] + counts).tolist()
        spec = self.spec
        index = {name: j for j, name in enumerate(schema.names)}
        if len(spec.entity) != 1 or len(index) != len(schema.names):
            return None, first[-1]  # composite keys, or a name twice: read as a table's columns are

        def typed(name: str, t: pa.DataType) -> tuple[int, int] | None:
            j = index.get(name)
            return (j, first[j]) if j is not None and schema.field(j).type == t else None

        floats = [spec.time, *self._numeric_columns(), *(spec.geo_columns or ())]
        if set(floats) & set(self._text_columns()):
            return None, first[-1]  # a column read both as text and as a number: the general path
        plan = {name: typed(name, pa.string()) for name in self._text_columns()}
        plan.update({name: typed(name, pa.float64()) for name in floats})
        if any(v is None for v in plan.values()):
            return None, first[-1]
        return plan, first[-1]  # type: ignore[return-value]

    def _text_columns(self) -> list[str]:
        spec = self.spec
        return list(dict.fromkeys([spec.entity[0], *(f.column[0] for f in spec.features if f.kind in ("category", "new_for_entity")
                                                     or (f.kind == "window" and f.agg == "distinct"))]))

    def _numeric_columns(self) -> list[str]:
        spec = self.spec
        return list(dict.fromkeys([*spec.value_columns, *(f.column[0] for f in spec.features if f.kind == "numeric")]))

    def decode(self, events: RawMessage | pa.Table, offset: int = 0) -> EventBatch:
        """:func:`decode_events` of what :meth:`read` gave (the same batch, the same errors)."""
        plan = self._plan
        if isinstance(events, RawMessage) and plan is not None and events.schema is self._schema:
            batch = self._decode(events, plan)
            if batch is not None:
                return batch
        if isinstance(events, RawMessage):
            try:  # the general path reads the buffers unchecked too
                events = events.table()
                events.validate(full=True)
            except (pa.ArrowException, OSError) as e:
                raise EventError(f"the events are not valid Arrow data: {e}") from None
        return decode_events(events, self.spec, offset)

    def _decode(self, m: RawMessage, plan: dict[str, tuple[int, int]]) -> EventBatch | None:
        spec, n, data = self.spec, m.num_rows, m.data
        for node, _ in plan.values():
            if m.nodes[node][1]:
                return None  # nulls: the general path refuses or fills them
        floats = {}
        for name in [spec.time, *self._numeric_columns(), *(spec.geo_columns or ())]:
            start, length = m.buffers[plan[name][1] + 1]
            if length < 8 * n:
                return None
            x = np.frombuffer(data, dtype=np.float64, count=n, offset=start) if n else np.empty(0)
            floats[name] = x if x.flags.aligned else x.copy()
        hashes = {}
        for name in self._text_columns():
            (o_start, o_len), (d_start, d_len) = m.buffers[plan[name][1] + 1], m.buffers[plan[name][1] + 2]
            out = np.empty(n, dtype=np.uint64)
            if n:
                if o_len < 4 * (n + 1):
                    return None
                offsets = np.frombuffer(data, dtype=np.int32, count=n + 1, offset=o_start)
                raw = np.frombuffer(data, dtype=np.uint8, count=d_len, offset=d_start)
                if not _fnv_checked(offsets if offsets.flags.aligned else offsets.copy(), raw, 0, n, out):
                    return None  # offsets outside the data: Arrow's validation names it
            hashes[name] = out.view(np.int64)
        time = floats[spec.time]
        geo = (floats[spec.geo_columns[0]], floats[spec.geo_columns[1]]) if spec.geo_columns is not None else None
        lat, lon = geo if geo is not None else (time[:0], time[:0])
        if _bad_row(time, lat, lon) >= 0:
            return None  # the general path raises, naming the row
        text = self._text_columns()
        return EventBatch(n, hashes[text[0]], time, {c: floats[c] for c in self._numeric_columns()},
                          {c: Categories(hashes[c]) for c in text[1:]}, geo)
