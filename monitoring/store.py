"""The feedback store: captured predictions and reviewers' labels, durably.

Storage only (no server code). :class:`Store` is the interface; :func:`open_store` gives the
embedded default, one SQLite file in WAL mode shared by every worker process of a server and by the
CLI. PostgreSQL (or anything else) can implement the same protocol.

Durability: :meth:`Store.add_labels` commits with ``synchronous=FULL`` (in WAL mode: the WAL is
fsynced at every commit), so a label is on disk when the call returns. Captured predictions are
high-volume and best-effort: they commit with ``synchronous=NORMAL`` (durable at the next checkpoint,
safe against a crashed process, not against a power cut).

Concurrency: every thread gets its own connection; writers take the database lock up front
(``BEGIN IMMEDIATE``) and keep transactions short; ``busy_timeout`` makes a writer wait for another
process's transaction instead of failing.
"""

from __future__ import annotations

import functools
import itertools
import math
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from outlierd.core.errors import InvalidInputError, StoreUnavailableError
from outlierd.core.labels import ANOMALY, LABELS
from outlierd.core.registry import CHALLENGER, CHAMPION

ROLES = (CHAMPION, CHALLENGER)
DEFAULT_FILENAME = "feedback.sqlite"
BUSY_TIMEOUT_MS = 10_000
SCHEMA_VERSION = 2
PRUNE_CHUNK = 20_000  # predictions visited per retention transaction
INSERT_ROWS = 128  # captured records per INSERT statement (6 parameters each)


@dataclass(frozen=True)
class LabelRow:
    record_id: str
    label: str          # "anomaly" | "normal"
    reviewer: str = ""
    note: str = ""
    ts: float = 0.0     # time stored (epoch s); 0 when handing a row to add_labels: the store stamps it


def _f64(n: int = 0) -> np.ndarray:
    return np.zeros(n, dtype=np.float64)


@dataclass
class Predictions:
    """Columnar, one row per captured record, in capture order."""

    record_id: list[str]
    version: np.ndarray     # int64
    role: list[str]         # "champion" | "challenger" (shadow/split captures)
    score: np.ndarray       # float64
    flagged: np.ndarray     # bool (score >= the threshold in force)
    sampled: np.ndarray     # bool (captured by the random sample rather than because flagged)
    ts: np.ndarray          # float64 epoch seconds
    latency_us: np.ndarray  # float64: kernel time per record of the batch it was scored in (NaN: unknown)
    X: np.ndarray           # float32 (n, n_features); (n, 0) when read with features=False
    sample_rate: np.ndarray = field(default_factory=_f64)  # float64: the capture sample rate in force (for recall estimates)

    def __len__(self) -> int:
        return len(self.record_id)


@runtime_checkable
class Store(Protocol):
    """Captured predictions and labels, per model name. SQLite (WAL) is the embedded default."""

    def add_predictions(self, model: str, version: int, role: str, record_ids: Sequence[str], X: np.ndarray,
                        scores: np.ndarray, flagged: np.ndarray, sampled: np.ndarray, latency_us: float | np.ndarray,
                        ts: float | np.ndarray | None = None, *, sample_rate: float | np.ndarray = float("nan")) -> None:
        """Append captured records (one transaction)."""

    def add_labels(self, model: str, rows: Sequence[LabelRow]) -> list[bool]:
        """Store labels in one transaction, durable (committed and fsynced) when it returns; returns,
        per row, whether a captured prediction has its record id (``known_record``). Raises
        ``ValueError`` (nothing stored) for an empty record id or a label outside :data:`LABELS`."""

    def labels(self, model: str) -> list[LabelRow]:
        """Every stored label, in arrival order (duplicates kept: they measure disagreement)."""

    def known(self, model: str, record_ids: Sequence[str]) -> list[bool]:
        """Per record id, whether a captured prediction of ``model`` has it."""

    def predictions(self, model: str, *, role: str | None = None, version: int | None = None,
                    features: bool = True) -> Predictions:
        """Captured records, in capture order, optionally of one role and/or version."""

    def labelled(self, model: str, *, role: str = "champion") -> tuple[np.ndarray, np.ndarray, list[str]]:
        """``(X float64 (n, d), y int8 (1 anomaly, 0 normal), record ids)``: the latest label of each
        record id that has a captured prediction of ``role`` (its latest capture's features)."""

    def close(self) -> None:
        ...


def default_store_path(registry_dir: str | os.PathLike) -> Path:
    """``<registry>/feedback.sqlite``."""
    return Path(registry_dir) / DEFAULT_FILENAME


def open_store(path: str | os.PathLike, *, on_retry: Callable[[str], None] | None = None) -> Store:
    """The store ``path`` names: a ``postgresql://`` URL opens :class:`~monitoring.store_pg.PostgresStore`
    (schema migrated on open), anything else the SQLite file there, created (with its schema) on
    first use. Raises ``OSError`` naming the path when it cannot be opened or written. ``on_retry``
    (PostgreSQL): called with "retry" or "failed" after each lost connection (counted in metrics)."""
    if is_store_url(path):
        from .store_pg import PostgresStore

        return PostgresStore(str(path), on_retry=on_retry)
    return SQLiteStore(path)


def is_store_url(location: object) -> bool:
    """Whether a ``--feedback-store`` value is a database URL (PostgreSQL) rather than a file path."""
    return isinstance(location, str) and location.startswith(("postgresql://", "postgres://"))


def store_location(feedback_store: str | os.PathLike | None, registry_dir: str | os.PathLike) -> str | Path:
    """What ``--feedback-store`` names: a database URL kept as given (a Path would fold its ``//``),
    a file path, or by default ``<registry>/feedback.sqlite``."""
    if feedback_store is None or feedback_store == "":
        return default_store_path(registry_dir)
    return feedback_store if is_store_url(feedback_store) else Path(feedback_store)  # type: ignore[return-value]


def store_name(location: str | os.PathLike) -> str:
    """``location`` for messages, logs and audit records: a URL without its password."""
    text = str(location)
    if not is_store_url(text):
        return text
    head, sep, tail = text.partition("://")
    cred, at, rest = tail.partition("@")
    if not at or ":" not in cred or "/" in cred:
        return text
    return f"{head}{sep}{cred.split(':', 1)[0]}:***@{rest}"


def store_exists(location: str | os.PathLike) -> bool:
    """Whether there is a store to read at ``location`` (a database URL always counts: it is opened to find out)."""
    return is_store_url(location) or Path(location).is_file()


class StoreOpener:
    """Opens the store on first use from any thread; after a failure, tries again at most every
    ``retry_s`` seconds (so a store that becomes writable later is picked up)."""

    def __init__(self, path: str | os.PathLike, opener: Callable[[str | os.PathLike], Store] = open_store, retry_s: float = 5.0):
        self.path, self._opener, self.retry_s = path, opener, retry_s
        self._store: Store | None = None
        self._error: BaseException | None = None
        self._failed_at = -math.inf
        self._lock = threading.Lock()

    def get(self) -> Store:
        """The open store, or ``OSError`` saying why it cannot be opened."""
        store = self._store
        if store is not None:
            return store
        with self._lock:
            if self._store is not None:
                return self._store
            if time.monotonic() - self._failed_at < self.retry_s and self._error is not None:
                raise StoreUnavailableError(f"feedback store {self.path} unavailable: {self._error}")
            try:
                self._store = self._opener(self.path)
            except Exception as e:
                self._error, self._failed_at = e, time.monotonic()
                raise StoreUnavailableError(f"feedback store {self.path} unavailable: {e}") from e
            return self._store

    def close(self) -> None:
        with self._lock:
            if self._store is not None:
                self._store.close()
                self._store = None


def validate_label(label: str) -> str:
    if label not in LABELS:
        raise InvalidInputError(f"label must be one of {', '.join(LABELS)}; got {label!r}")
    return label

@dataclass(frozen=True)
class CaptureRows:
    """One ``add_predictions`` call's columns, validated and laid out for writing (both stores)."""
    n: int
    d: int
    ids: list[str]
    blobs: list[bytes]      # each record's features, little-endian float32
    flags: list[int]        # bit 0 flagged, bit 1 sampled
    scores: np.ndarray
    lat: np.ndarray
    role: str
    flagged: np.ndarray
    sampled: np.ndarray
    rate: np.ndarray
    # rows sharing (ts, sample rate) share a batch row: all of them when both are one value
    parts: dict[tuple, list[int]]

    def totals(self, model: str) -> tuple:
        """The capture_totals increment: flagged, sampled-unflagged, their inverse-rate weight, those without a rate."""
        su = self.sampled & ~self.flagged
        usable = su & np.isfinite(self.rate) & (self.rate > 0)
        return (model, self.role, int(self.flagged.sum()), int(su.sum()), float(np.sum(1.0 / self.rate[usable])),
                int(su.sum() - usable.sum()))


def capture_rows(role: str, record_ids: Sequence[str], X: np.ndarray, scores: np.ndarray, flagged: np.ndarray,
                 sampled: np.ndarray, latency_us: float | np.ndarray, ts: float | np.ndarray | None,
                 sample_rate: float | np.ndarray) -> CaptureRows | None:
    """Validate one capture call (InvalidInputError naming what is wrong); None when it holds no record.
    ``latency_us``, ``ts`` (default: now) and ``sample_rate`` are one value for all rows or one per row."""
    n = len(record_ids)
    X = np.ascontiguousarray(X, dtype="<f4")
    if X.ndim != 2 or X.shape[0] != n:
        raise InvalidInputError(f"X must be (n_records, n_features) with n_records={n}; got shape {X.shape}")
    scores = np.asarray(scores, dtype=np.float64)
    flagged, sampled = np.asarray(flagged, dtype=bool), np.asarray(sampled, dtype=bool)
    for name, a in (("scores", scores), ("flagged", flagged), ("sampled", sampled)):
        if a.shape != (n,):
            raise InvalidInputError(f"{name} must hold one value per record ({n}); got shape {a.shape}")
    if role not in ROLES:
        raise InvalidInputError(f"role must be one of {', '.join(ROLES)}; got {role!r}")
    if n == 0:
        return None
    lat = np.broadcast_to(np.asarray(latency_us, dtype=np.float64), (n,))
    rate = np.broadcast_to(np.asarray(sample_rate, dtype=np.float64), (n,))
    when = np.broadcast_to(np.asarray(time.time() if ts is None else ts, dtype=np.float64), (n,))
    d = X.shape[1]
    # columns to Python lists in C (.tolist), rows by zip: this runs for every captured record.
    buf, rb = X.tobytes(), 4 * d
    blobs = [buf[i:i + rb] for i in range(0, n * rb, rb)]
    flags = (flagged.astype(np.int8) | (sampled.astype(np.int8) << 1)).tolist()
    parts: dict[tuple, list[int]] = {}
    if np.ndim(sample_rate) == 0 and (ts is None or np.ndim(ts) == 0):
        parts[(float(when[0]), None if np.isnan(rate[0]) else float(rate[0]))] = list(range(n))
    else:
        for i, (t, r) in enumerate(zip(when.tolist(), rate.tolist())):
            parts.setdefault((t, None if r != r else r), []).append(i)
    return CaptureRows(n, d, list(map(str, record_ids)), blobs, flags, scores, lat, role, flagged, sampled, rate, parts)


def validate_labels(rows: Sequence[LabelRow]) -> None:
    """InvalidInputError naming the first label row that cannot be stored."""
    for i, r in enumerate(rows):
        if not r.record_id:
            raise InvalidInputError(f"label {i}: record_id is empty")
        try:
            validate_label(r.label)
        except ValueError as e:
            raise InvalidInputError(f"label {i} (record_id {r.record_id!r}): {e}") from None

def predictions_query(model: str, role: str | None, version: int | None, features: bool, mark: str) -> tuple[str, list[str | int]]:
    """The captured-records query of ``Store.predictions`` (both stores) and its parameters;
    ``mark``: the driver's placeholder (``?`` or ``%s``)."""
    where = [f"b.model = {mark}"]
    params: list[str | int] = [model]
    if role is not None:
        where.append(f"b.role = {mark}")
        params.append(role)
    if version is not None:
        where.append(f"b.version = {mark}")
        params.append(int(version))
    cols = "p.record_id, b.version, b.role, p.score, p.flags, b.ts, p.latency_us, b.sample_rate, b.n_features" + (", p.x" if features else "")
    return (f"SELECT {cols} FROM predictions AS p JOIN capture_batches AS b ON b.id = p.batch "
            f"WHERE {' AND '.join(where)} ORDER BY p.id", params)




_SCHEMA = """  -- statements are split on semicolons: none in comments

CREATE TABLE IF NOT EXISTS capture_batches (  -- what the rows of one write share
    id INTEGER PRIMARY KEY,
    model TEXT NOT NULL,
    version INTEGER NOT NULL,
    role TEXT NOT NULL,
    n_features INTEGER NOT NULL,
    sample_rate REAL,
    ts REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS predictions (  -- one row per captured record, lean: this is written for every capture
    id INTEGER PRIMARY KEY,    -- the rowid: capture order (pruning deletes the oldest, and AUTOINCREMENT would cost a write per insert)
    batch INTEGER NOT NULL REFERENCES capture_batches (id),
    record_id TEXT NOT NULL,
    score REAL NOT NULL,
    flags INTEGER NOT NULL,    -- 1: flagged, 2: sampled
    latency_us REAL,
    x BLOB NOT NULL            -- little-endian float32, n_features values
);
CREATE INDEX IF NOT EXISTS predictions_record ON predictions (record_id);
CREATE TABLE IF NOT EXISTS labels (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    model TEXT NOT NULL,
    record_id TEXT NOT NULL,
    label TEXT NOT NULL CHECK (label IN ('anomaly', 'normal')),
    reviewer TEXT NOT NULL DEFAULT '',
    note TEXT NOT NULL DEFAULT '',
    ts REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS labels_model_record ON labels (model, record_id);
CREATE TABLE IF NOT EXISTS capture_totals (  -- kept up to date by add_predictions: live quality without scanning captures
    model TEXT NOT NULL,
    role TEXT NOT NULL,
    flagged INTEGER NOT NULL DEFAULT 0,        -- flagged captures
    sampled INTEGER NOT NULL DEFAULT 0,        -- sampled unflagged captures
    sampled_weight REAL NOT NULL DEFAULT 0,    -- sum of 1 / sample rate over them: the unflagged records they stand for
    sampled_no_rate INTEGER NOT NULL DEFAULT 0,  -- ... of which without a usable sample rate
    PRIMARY KEY (model, role)
);
"""


class SQLiteStore:
    """:class:`Store` on one SQLite file in WAL mode (see the module docstring)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._local = threading.local()
        self._conns: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._closed = False
        conn = self._conn()  # fail now, naming the file, rather than on the first write
        try:
            found = conn.execute("PRAGMA user_version").fetchone()[0]
            if found not in (0, SCHEMA_VERSION):
                raise StoreUnavailableError(f"feedback store {self.path} has schema version {found}; this outlierd reads version "
                              f"{SCHEMA_VERSION}: export its labels with the outlierd that wrote it, or start a new store")
            with self._write(conn, durable=True):
                for stmt in _SCHEMA.split(";"):
                    if stmt.strip():
                        conn.execute(stmt)
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except sqlite3.Error as e:
            raise StoreUnavailableError(f"cannot write the feedback store {self.path}: {e}") from e

    def __repr__(self) -> str:
        return f"SQLiteStore({str(self.path)!r})"

    # -- connections ------------------------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            return conn
        if self._closed:
            raise StoreUnavailableError(f"feedback store {self.path} is closed")
        try:
            # autocommit mode: transactions are explicit (BEGIN IMMEDIATE ... COMMIT)
            conn = sqlite3.connect(str(self.path), timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None,
                                   check_same_thread=False)
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise sqlite3.OperationalError(f"journal_mode is {mode!r}, WAL is required")
            conn.execute("PRAGMA synchronous = FULL")
        except sqlite3.Error as e:
            raise StoreUnavailableError(f"cannot open the feedback store {self.path}: {e}") from e
        self._local.conn = conn
        with self._lock:
            self._conns.append(conn)
        return conn

    class _Txn:
        def __init__(self, conn: sqlite3.Connection, durable: bool):
            self.conn, self.durable = conn, durable

        def __enter__(self) -> sqlite3.Connection:
            # synchronous is per connection and may change between transactions
            self.conn.execute("PRAGMA synchronous = " + ("FULL" if self.durable else "NORMAL"))
            self.conn.execute("BEGIN IMMEDIATE")  # take the write lock now: no upgrade deadlocks
            return self.conn

        def __exit__(self, exc_type, exc, tb) -> None:
            if exc_type is None:
                self.conn.execute("COMMIT")
            else:
                try:
                    self.conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass

    def _write(self, conn: sqlite3.Connection, durable: bool) -> SQLiteStore._Txn:
        return SQLiteStore._Txn(conn, durable)

    def close(self) -> None:
        """Close every thread's connection (checkpointing the WAL when this is the last one)."""
        self._closed = True
        with self._lock:
            conns, self._conns = self._conns, []
        for c in conns:
            try:
                c.close()
            except sqlite3.Error:
                pass
        self._local = threading.local()

    # -- writes ------------------------------------------------------------------------------

    def add_predictions(self, model: str, version: int, role: str, record_ids: Sequence[str], X: np.ndarray,
                        scores: np.ndarray, flagged: np.ndarray, sampled: np.ndarray, latency_us: float | np.ndarray,
                        ts: float | np.ndarray | None = None, *, sample_rate: float | np.ndarray = float("nan")) -> None:
        """Append captured records in one (non-fsynced) transaction. ``latency_us``, ``ts`` (default:
        now) and ``sample_rate`` are one value for all rows or one per row."""
        cap = capture_rows(role, record_ids, X, scores, flagged, sampled, latency_us, ts, sample_rate)
        if cap is None:
            return
        n, d, ids, blobs, flags, parts, totals = cap.n, cap.d, cap.ids, cap.blobs, cap.flags, cap.parts, cap.totals(model)
        scores, lat = cap.scores, cap.lat
        scores_l, lat_l = scores.tolist(), lat.tolist()
        conn = self._conn()
        with self._write(conn, durable=False):
            for (t, r), idx in parts.items():
                batch = conn.execute("INSERT INTO capture_batches (model, version, role, n_features, sample_rate, ts) VALUES (?, ?, ?, ?, ?, ?)",
                                     (model, int(version), role, d, r, t)).lastrowid
                if len(idx) == n:
                    rows: list = list(zip(itertools.repeat(batch), ids, scores_l, flags, lat_l, blobs))
                else:
                    rows = [(batch, ids[i], scores_l[i], flags[i], lat_l[i], blobs[i]) for i in idx]
                # multi-row INSERTs: one statement step per INSERT_ROWS rows. executemany steps once per
                # row, and the sqlite3 module releases and retakes the GIL around every step: with the
                # event loop waiting for the GIL, that is a thread switch per captured record.
                for k in range(0, len(rows), INSERT_ROWS):
                    chunk = rows[k:k + INSERT_ROWS]
                    conn.execute(_insert_rows(len(chunk)), list(itertools.chain.from_iterable(chunk)))
            conn.execute("INSERT INTO capture_totals (model, role, flagged, sampled, sampled_weight, sampled_no_rate) VALUES (?, ?, ?, ?, ?, ?) "
                         "ON CONFLICT (model, role) DO UPDATE SET flagged = flagged + excluded.flagged, sampled = sampled + excluded.sampled, "
                         "sampled_weight = sampled_weight + excluded.sampled_weight, sampled_no_rate = sampled_no_rate + excluded.sampled_no_rate",
                         totals)

    def add_labels(self, model: str, rows: Sequence[LabelRow]) -> list[bool]:
        """See :meth:`Store.add_labels`: one transaction, fsynced before returning."""
        validate_labels(rows)
        if not rows:
            return []
        now = time.time()
        conn = self._conn()
        with self._write(conn, durable=True):
            known = [conn.execute(_KNOWN, (r.record_id, model)).fetchone() is not None for r in rows]
            conn.executemany("INSERT INTO labels (model, record_id, label, reviewer, note, ts) VALUES (?, ?, ?, ?, ?, ?)",
                             [(model, r.record_id, r.label, r.reviewer or "", r.note or "", r.ts or now) for r in rows])
        return known

    # -- retention ---------------------------------------------------------------------------

    def live_bytes(self) -> int:
        """Bytes of the file in use (free pages, which new rows reuse, not counted)."""
        conn = self._conn()
        pages = conn.execute("PRAGMA page_count").fetchone()[0] - conn.execute("PRAGMA freelist_count").fetchone()[0]
        return int(pages * conn.execute("PRAGMA page_size").fetchone()[0])

    def prune(self, max_age_s: float | None = None, max_bytes: int | None = None, *, now: float | None = None,
              chunk: int = PRUNE_CHUNK) -> int:
        """Delete captured predictions, oldest first, that are older than ``max_age_s`` or while
        the store holds more than ``max_bytes``; never a prediction whose record id carries a label
        (labelled records and their predictions are what recalibration and retraining learn
        from). Short transactions of at most ``chunk`` rows, so capture and labels never wait
        long. Returns the number of predictions deleted. The file stops growing rather than
        shrinking: freed pages are reused by new captures."""
        cutoff = None if max_age_s is None else (time.time() if now is None else now) - max_age_s
        deleted = 0
        conn = self._conn()
        after = -1  # the walk's position: predictions are visited in capture (rowid) order
        kept: set[int] = set()  # batches that keep a labelled prediction
        while True:
            over = max_bytes is not None and self.live_bytes() > max_bytes
            if cutoff is None and not over:
                break
            rows = conn.execute(
                "SELECT p.id, p.batch, b.ts, EXISTS (SELECT 1 FROM labels AS l WHERE l.model = b.model AND "
                "l.record_id = p.record_id) FROM predictions AS p JOIN capture_batches AS b ON b.id = p.batch "
                "WHERE p.id > ? ORDER BY p.id LIMIT ?", (after, chunk)).fetchall()
            doomed: list[tuple[int]] = []
            seen: list[int] = []  # batches visited, in order (a batch's rows are contiguous and share its ts)
            stop = len(rows) < chunk  # the end of the table: every batch visited is complete
            for pid, batch, ts, labelled in rows:
                if not over and (cutoff is None or ts >= cutoff):
                    stop = True  # young enough, and the store is within its size: done
                    break
                after = pid
                if not seen or seen[-1] != batch:
                    seen.append(batch)
                if labelled:
                    kept.add(batch)
                else:
                    doomed.append((pid,))
            if not stop and seen:
                seen.pop()  # may go on in the next chunk
            with self._write(conn, durable=False):
                conn.executemany("DELETE FROM predictions WHERE id = ?", doomed)
                conn.executemany("DELETE FROM capture_batches WHERE id = ?", [(b,) for b in seen if b not in kept])
            deleted += len(doomed)
            if stop:
                break
        return deleted

    # -- reads -------------------------------------------------------------------------------

    def known(self, model: str, record_ids: Sequence[str]) -> list[bool]:
        conn = self._conn()
        return [conn.execute(_KNOWN, (rid, model)).fetchone() is not None for rid in record_ids]

    def labels(self, model: str) -> list[LabelRow]:
        cur = self._conn().execute("SELECT record_id, label, reviewer, note, ts FROM labels WHERE model = ? ORDER BY id", (model,))
        return [LabelRow(*row) for row in cur]

    def predictions(self, model: str, *, role: str | None = None, version: int | None = None,
                    features: bool = True) -> Predictions:
        rows = self._conn().execute(*predictions_query(model, role, version, features, "?")).fetchall()
        return _columns(rows, features)

    def labelled(self, model: str, *, role: str = "champion") -> tuple[np.ndarray, np.ndarray, list[str]]:
        # SQLite returns the bare columns of the row that holds MAX(id): each record's latest label;
        # its latest capture of `role` is one index lookup
        rows = self._conn().execute(
            """
            SELECT l.record_id, l.label, b.n_features, p.x FROM
              (SELECT record_id, label, MAX(id) AS lid FROM labels WHERE model = ?1 GROUP BY record_id) AS l
              JOIN predictions AS p ON p.id = (SELECT p2.id FROM predictions AS p2 JOIN capture_batches AS b2 ON b2.id = p2.batch
                                               WHERE p2.record_id = l.record_id AND b2.model = ?1 AND b2.role = ?2
                                               ORDER BY p2.id DESC LIMIT 1)
              JOIN capture_batches AS b ON b.id = p.batch
            ORDER BY l.lid
            """, (model, role)).fetchall()
        ids = [r[0] for r in rows]
        y = np.array([1 if r[1] == ANOMALY else 0 for r in rows], dtype=np.int8)
        X = _stack([r[2] for r in rows], [r[3] for r in rows]).astype(np.float64)
        return X, y, ids

    def quality_inputs(self, model: str, role: str = "champion") -> dict:
        """What live quality needs, without reading every capture: the capture totals of ``role``
        and, for each labelled record id, its latest ``role`` capture's (flagged, sampled) or None,
        and whether any role captured it. Cost: one index lookup per labelled record."""
        c = self._conn()
        row = c.execute("SELECT flagged, sampled, sampled_weight, sampled_no_rate FROM capture_totals WHERE model = ? AND role = ?",
                        (model, role)).fetchone() or (0, 0, 0.0, 0)
        captures, known = {}, set()
        for rid, flags, any_role in c.execute(
                """
                SELECT l.record_id,
                  (SELECT p.flags FROM predictions AS p JOIN capture_batches AS b ON b.id = p.batch
                     WHERE p.record_id = l.record_id AND b.model = ?1 AND b.role = ?2 ORDER BY p.id DESC LIMIT 1),
                  EXISTS (SELECT 1 FROM predictions AS p JOIN capture_batches AS b ON b.id = p.batch
                          WHERE p.record_id = l.record_id AND b.model = ?1)
                FROM (SELECT DISTINCT record_id FROM labels WHERE model = ?1) AS l
                """, (model, role)):
            captures[rid] = None if flags is None else (bool(flags & 1), bool(flags & 2))
            if any_role:
                known.add(rid)
        return {"captured_flagged": int(row[0]), "captured_sampled": int(row[1]), "sampled_weight": float(row[2]),
                "sampled_no_rate": int(row[3]), "captures": captures, "known": known}

    def unlabelled_alerts(self, model: str, *, since: float | None = None, limit: int = 100) -> Predictions:
        """The review queue: flagged champion captures of ``model`` whose record id carries no label
        yet, newest first, at most ``limit`` (one per record id: its latest capture), captured at or
        after ``since`` (epoch s) when given."""
        rows = self._conn().execute(_UNLABELLED.replace("%s", "?"), (model, -math.inf if since is None else since, int(limit))).fetchall()
        return _columns(rows, True)

    def counts(self, model: str) -> dict[str, int]:
        """Rows stored for ``model``: ``predictions``, ``labels``."""
        c = self._conn()
        return {"predictions": c.execute("SELECT COUNT(*) FROM predictions AS p JOIN capture_batches AS b ON b.id = p.batch "
                                         "WHERE b.model = ?", (model,)).fetchone()[0],
                "labels": c.execute("SELECT COUNT(*) FROM labels WHERE model = ?", (model,)).fetchone()[0]}

    def journal_mode(self) -> str:
        return str(self._conn().execute("PRAGMA journal_mode").fetchone()[0]).lower()


def _stack(widths: list[int], blobs: list[bytes]) -> np.ndarray:
    if not blobs:
        return np.zeros((0, 0), dtype=np.float32)
    d = widths[0]
    if any(w != d for w in widths):
        raise InvalidInputError(f"captured records have different feature counts ({sorted(set(widths))}); select one version")
    return np.frombuffer(b"".join(blobs), dtype="<f4").reshape(len(blobs), d).astype(np.float32)


def _columns(rows: list[tuple], features: bool) -> Predictions:
    n = len(rows)
    cols = list(zip(*rows)) if rows else [()] * 10

    def f64(col: tuple) -> np.ndarray:
        return np.array([np.nan if v is None else v for v in col], dtype=np.float64).reshape(n)

    flags = np.array(cols[4], dtype=np.int64).reshape(n)
    X = _stack(list(cols[8]), list(cols[9])) if features else np.zeros((n, 0), dtype=np.float32)
    return Predictions(record_id=list(cols[0]), version=np.array(cols[1], dtype=np.int64).reshape(n), role=list(cols[2]),
                       score=np.array(cols[3], dtype=np.float64).reshape(n), flagged=(flags & 1).astype(bool),
                       sampled=(flags & 2).astype(bool), ts=np.array(cols[5], dtype=np.float64).reshape(n),
                       latency_us=f64(cols[6]), X=X, sample_rate=f64(cols[7]))


@functools.cache
def _insert_rows(m: int) -> str:
    return "INSERT INTO predictions (batch, record_id, score, flags, latency_us, x) VALUES " + ", ".join(["(?, ?, ?, ?, ?, ?)"] * m)


_KNOWN = "SELECT 1 FROM predictions AS p JOIN capture_batches AS b ON b.id = p.batch WHERE p.record_id = ? AND b.model = ? LIMIT 1"


# the review queue (both stores; %s placeholders, SQLite's replaced by ?): flagged champion captures
# without a label, each record id once (its latest capture), newest first
_UNLABELLED = """
SELECT p.record_id, b.version, b.role, p.score, p.flags, b.ts, p.latency_us, b.sample_rate, b.n_features, p.x
FROM predictions AS p JOIN capture_batches AS b ON b.id = p.batch
WHERE b.model = %s AND b.role = 'champion' AND (p.flags & 1) = 1 AND b.ts >= %s
  AND NOT EXISTS (SELECT 1 FROM labels AS l WHERE l.model = b.model AND l.record_id = p.record_id)
  AND NOT EXISTS (SELECT 1 FROM predictions AS p2 JOIN capture_batches AS b2 ON b2.id = p2.batch
                  WHERE p2.record_id = p.record_id AND b2.model = b.model AND b2.role = 'champion' AND p2.id > p.id)
ORDER BY p.id DESC LIMIT %s
"""
