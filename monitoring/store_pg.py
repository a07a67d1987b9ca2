"""The feedback store on PostgreSQL: one store for many replicas and broker consumers.

:class:`PostgresStore` implements the same :class:`~monitoring.store.Store` protocol (and the extras
the SQLite store has: ``quality_inputs``, ``counts``, ``prune``, ``unlabelled``) with psycopg 3. It is
chosen by giving ``--feedback-store`` a ``postgresql://`` URL (:func:`monitoring.store.open_store`).

Schema: versioned migrations (:data:`MIGRATIONS`), applied when a store opens, inside one transaction
holding an advisory lock, so replicas starting at once apply each migration exactly once; the
version reached is in ``outlierd_schema``. A database with a newer version than this outlierd knows
is refused (as SQLite's ``user_version``).

Durability: labels commit with ``synchronous_commit = on`` (the commit is flushed to PostgreSQL's
WAL before :meth:`add_labels` returns, so an acknowledged label survives a crash of either side).
Captures commit with ``synchronous_commit = off`` (best-effort, like SQLite's ``NORMAL``) and go in
with ``COPY``, one statement per batch.

Connection loss: every thread has its own connection; a failed one is dropped and the next call
opens a new one. Calls that cannot have changed anything (reads, and writes whose connection was
lost before their COMMIT was sent: after a PostgreSQL restart, the first statement on an old
connection) are retried with backoff, :data:`RETRIES` times; a write that lost its connection during
the COMMIT is not (it may or may not have committed), and captures never are (the capture process
moves on). Then :class:`~core.errors.StoreUnavailableError`, which the server answers with
UNAVAILABLE (the client retries; a label is never acknowledged unless committed). Retries and
failures are counted in ``retries`` / ``failures`` (and passed to ``on_retry``).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np

from outlierd.core.errors import InvalidInputError, StoreUnavailableError
from outlierd.core.labels import ANOMALY

from .store import _UNLABELLED, LabelRow, Predictions, _columns, _stack, capture_rows, predictions_query, store_name, validate_labels

CONNECT_TIMEOUT_S = 3
RETRIES = 3
BACKOFF_S = (0.1, 0.3, 0.9)  # before each retry
_PREDICTION_TYPES = ("int8", "text", "float8", "int2", "float8", "bytea")  # the COPY columns of predictions
ANALYZE_AFTER = frozenset({1, 8, 64, 512, 4096})  # writes of one store after which the tables are analyzed
LOCK_KEY = 0x6F75746C  # "outl": the advisory lock migrations take (per database)
T = TypeVar("T")

# Each migration runs once, in order, in the transaction that holds the advisory lock. Append new
# ones; never edit an applied one.
MIGRATIONS: tuple[tuple[int, str], ...] = (
    (1, """
CREATE TABLE capture_batches (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    model TEXT NOT NULL,
    version BIGINT NOT NULL,
    role TEXT NOT NULL,
    n_features INTEGER NOT NULL,
    sample_rate DOUBLE PRECISION,
    ts DOUBLE PRECISION NOT NULL
);
CREATE INDEX capture_batches_model ON capture_batches (model, role, version);
CREATE TABLE predictions (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    batch BIGINT NOT NULL REFERENCES capture_batches (id) ON DELETE CASCADE,
    record_id TEXT NOT NULL,
    score DOUBLE PRECISION NOT NULL,
    flags SMALLINT NOT NULL,
    latency_us DOUBLE PRECISION,
    x BYTEA NOT NULL
);
CREATE INDEX predictions_record ON predictions (record_id);
CREATE INDEX predictions_batch ON predictions (batch);
CREATE TABLE labels (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    model TEXT NOT NULL,
    record_id TEXT NOT NULL,
    label TEXT NOT NULL CHECK (label IN ('anomaly', 'normal')),
    reviewer TEXT NOT NULL DEFAULT '',
    note TEXT NOT NULL DEFAULT '',
    ts DOUBLE PRECISION NOT NULL
);
CREATE INDEX labels_model_record ON labels (model, record_id);
CREATE TABLE capture_totals (
    model TEXT NOT NULL,
    role TEXT NOT NULL,
    flagged BIGINT NOT NULL DEFAULT 0,
    sampled BIGINT NOT NULL DEFAULT 0,
    sampled_weight DOUBLE PRECISION NOT NULL DEFAULT 0,
    sampled_no_rate BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (model, role)
)
"""),
    # the foreign key's check ran once per captured row (an RI trigger each) and took about half of a
    # capture transaction's server time; SQLite never enforced it (foreign_keys is off there) and
    # batches are only deleted once no prediction points at them (prune)
    (2, "ALTER TABLE predictions DROP CONSTRAINT IF EXISTS predictions_batch_fkey"),
)
SCHEMA_VERSION = MIGRATIONS[-1][0]


def _psycopg() -> Any:
    try:
        import psycopg
    except ImportError as e:  # the postgres extra is not installed
        raise StoreUnavailableError("a postgresql:// feedback store needs psycopg 3: pip install 'outlierd[postgres]'") from e
    return psycopg


class PostgresStore:
    """:class:`~monitoring.store.Store` on PostgreSQL (see the module docstring). ``url``: a libpq
    URL (``postgresql://user:pass@host:5432/db?options=-csearch_path%3Dschema``)."""

    def __init__(self, url: str, *, on_retry: Callable[[str], None] | None = None, connect_timeout_s: float = CONNECT_TIMEOUT_S):
        self.url = url
        self.name = store_name(url)
        self.on_retry = on_retry
        self.connect_timeout_s = connect_timeout_s
        self.retries = 0   # calls tried again after a lost or refused connection
        self.failures = 0  # calls that failed for good (StoreUnavailableError)
        self._pg = _psycopg()
        self._local = threading.local()
        self._conns: list[Any] = []
        self._lock = threading.Lock()
        self._closed = False
        self._writes = 0
        self._call(self._migrate, retry=True)

    def __repr__(self) -> str:
        return f"PostgresStore({self.name!r})"

    # -- connections and retries ---------------------------------------------------------------

    def _conn(self) -> Any:
        conn = getattr(self._local, "conn", None)
        if conn is not None and not conn.closed:
            return conn
        if self._closed:
            raise StoreUnavailableError(f"feedback store {self.name} is closed")
        conn = self._pg.connect(self.url, connect_timeout=max(1, int(self.connect_timeout_s)), autocommit=False,
                                application_name="outlierd",
                                # a server that went away without closing the socket is noticed in seconds
                                keepalives=1, keepalives_idle=5, keepalives_interval=2, keepalives_count=3)
        self._local.conn = conn
        with self._lock:
            self._conns.append(conn)
        return conn

    def _drop(self) -> None:
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            with self._lock:
                if conn in self._conns:
                    self._conns.remove(conn)
            try:
                conn.close()
            except Exception:
                pass

    def _call(self, fn: Callable[[Any], T], *, retry: bool, retry_connect: bool = True) -> T:
        """``fn(connection)``, in a transaction committed when it returns. A lost connection is
        dropped, and the call retried (with backoff) when ``retry`` (reads), or when
        ``retry_connect`` and it was lost before the COMMIT was sent: the transaction cannot have
        committed then, so running it again stores nothing twice. A connection lost during the
        COMMIT leaves its outcome unknown: never retried (the caller is told UNAVAILABLE)."""
        pg = self._pg
        for attempt in range(RETRIES + 1):
            committing = False
            try:
                conn = self._conn()
                with conn.transaction():
                    out = fn(conn)
                    committing = True  # leaving the block sends the COMMIT
                return out
            except pg.errors.CheckViolation as e:
                raise InvalidInputError(f"feedback store {self.name} refused the rows: {e}") from e
            except (pg.OperationalError, pg.InterfaceError) as e:
                self._drop()
                if attempt < RETRIES and (retry or (retry_connect and not committing)) and not self._closed:
                    self.retries += 1
                    if self.on_retry is not None:
                        self.on_retry("retry")
                    time.sleep(BACKOFF_S[min(attempt, len(BACKOFF_S) - 1)])
                    continue
                self.failures += 1
                if self.on_retry is not None:
                    self.on_retry("failed")
                raise StoreUnavailableError(f"feedback store {self.name} unavailable: {str(e).strip() or type(e).__name__}") from e
        raise AssertionError("unreachable")

    def _migrate(self, conn: Any) -> None:
        # replicas starting at once: the first takes the lock and migrates, the others wait for it
        # and then find nothing to do
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_KEY,))
        conn.execute("CREATE TABLE IF NOT EXISTS outlierd_schema (version INTEGER PRIMARY KEY, applied_at DOUBLE PRECISION NOT NULL)")
        found = conn.execute("SELECT COALESCE(MAX(version), 0) FROM outlierd_schema").fetchone()[0]
        if found > SCHEMA_VERSION:
            raise StoreUnavailableError(f"feedback store {self.name} has schema version {found}; this outlierd knows up to "
                                        f"{SCHEMA_VERSION}: upgrade outlierd")
        for version, sql in MIGRATIONS:
            if version > found:
                for stmt in sql.split(";"):
                    if stmt.strip():
                        conn.execute(stmt)
                conn.execute("INSERT INTO outlierd_schema (version, applied_at) VALUES (%s, %s)", (version, time.time()))

    def schema_version(self) -> int:
        return int(self._call(lambda c: c.execute("SELECT MAX(version) FROM outlierd_schema").fetchone()[0], retry=True))

    def close(self) -> None:
        self._closed = True
        with self._lock:
            conns, self._conns = self._conns, []
        for c in conns:
            try:
                c.close()
            except Exception:
                pass
        self._local = threading.local()

    # -- writes ------------------------------------------------------------------------------

    def add_predictions(self, model: str, version: int, role: str, record_ids: Sequence[str], X: np.ndarray,
                        scores: np.ndarray, flagged: np.ndarray, sampled: np.ndarray, latency_us: float | np.ndarray,
                        ts: float | np.ndarray | None = None, *, sample_rate: float | np.ndarray = float("nan")) -> None:
        """Append captured records in one transaction (not waiting for the WAL flush), with COPY.
        Not retried after a lost connection: captures are best-effort (the caller counts them dropped)."""
        cap = capture_rows(role, record_ids, X, scores, flagged, sampled, latency_us, ts, sample_rate)
        if cap is None:
            return
        d, ids, blobs, flags, parts, totals = cap.d, cap.ids, cap.blobs, cap.flags, cap.parts, cap.totals(model)
        scores, lat = cap.scores, cap.lat
        scores_l = scores.tolist()
        lat_l = [None if v != v else v for v in lat.tolist()]  # NaN stored as NULL, as SQLite does

        def write(conn: Any) -> None:
            conn.execute("SET LOCAL synchronous_commit = off")
            for (t, r), idx in parts.items():
                batch = conn.execute("INSERT INTO capture_batches (model, version, role, n_features, sample_rate, ts) "
                                     "VALUES (%s, %s, %s, %s, %s, %s) RETURNING id", (model, int(version), role, d, r, t)).fetchone()[0]
                with conn.cursor().copy("COPY predictions (batch, record_id, score, flags, latency_us, x) FROM STDIN (FORMAT BINARY)") as cp:
                    cp.set_types(_PREDICTION_TYPES)  # binary COPY: no text formatting of floats and bytes
                    for i in idx:
                        cp.write_row((batch, ids[i], scores_l[i], flags[i], lat_l[i], blobs[i]))
            conn.execute("INSERT INTO capture_totals AS t (model, role, flagged, sampled, sampled_weight, sampled_no_rate) "
                         "VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (model, role) DO UPDATE SET flagged = t.flagged + excluded.flagged, "
                         "sampled = t.sampled + excluded.sampled, sampled_weight = t.sampled_weight + excluded.sampled_weight, "
                         "sampled_no_rate = t.sampled_no_rate + excluded.sampled_no_rate", totals)

        # captures never wait for a retry: the capture process moves on to the next frame
        self._call(write, retry=False, retry_connect=False)
        self._wrote()

    def add_labels(self, model: str, rows: Sequence[LabelRow]) -> list[bool]:
        """See :meth:`Store.add_labels`: one transaction, flushed to the WAL before returning."""
        validate_labels(rows)
        if not rows:
            return []
        now = time.time()
        ids = [r.record_id for r in rows]

        def write(conn: Any) -> list[bool]:
            conn.execute("SET LOCAL synchronous_commit = on")
            known = _known(conn, model, ids)
            with conn.cursor().copy("COPY labels (model, record_id, label, reviewer, note, ts) FROM STDIN") as cp:
                for r in rows:
                    cp.write_row((model, r.record_id, r.label, r.reviewer or "", r.note or "", r.ts or now))
            return [rid in known for rid in ids]

        known = self._call(write, retry=False)
        self._wrote()
        return known

    def _wrote(self) -> None:
        """Refresh the planner's statistics while the tables are young. NOTE: until autovacuum first
        analyzes them, PostgreSQL plans as if they were nearly empty: the per-label lookups of
        ``labelled`` then scan every capture batch (measured 300 labelled records/s instead of
        40,000+). After this store's 1st, 8th, 64th, 512th and 4096th write; autovacuum keeps them
        fresh after that."""
        self._writes += 1
        if self._writes in ANALYZE_AFTER:
            try:
                self._call(lambda c: c.execute("ANALYZE capture_batches, predictions, labels"), retry=False, retry_connect=False)
            except StoreUnavailableError:
                pass  # statistics are an optimisation: the next write's turn, or autovacuum's

    # -- retention ---------------------------------------------------------------------------

    def live_bytes(self) -> int:
        """Bytes the store's tables and indexes take."""
        return int(self._call(lambda c: c.execute(
            "SELECT COALESCE(SUM(pg_total_relation_size(c.oid)), 0) FROM pg_class AS c JOIN pg_namespace AS n ON n.oid = c.relnamespace "
            "WHERE n.nspname = current_schema() AND c.relkind = 'r' AND c.relname IN "
            "('capture_batches', 'predictions', 'labels', 'capture_totals')").fetchone()[0], retry=True))

    def prune(self, max_age_s: float | None = None, max_bytes: int | None = None, *, now: float | None = None,
              chunk: int = 20_000) -> int:
        """Delete captured predictions older than ``max_age_s`` (never one whose record id carries a
        label), in chunks; returns how many. ``max_bytes`` is not enforced here (PostgreSQL's size is
        the operator's, managed with the database's own tools)."""
        if max_age_s is None:
            return 0
        cutoff = (time.time() if now is None else now) - max_age_s
        deleted = 0
        while True:
            n = self._call(lambda c: c.execute(
                "DELETE FROM predictions WHERE id IN (SELECT p.id FROM predictions AS p JOIN capture_batches AS b ON b.id = p.batch "
                "WHERE b.ts < %s AND NOT EXISTS (SELECT 1 FROM labels AS l WHERE l.model = b.model AND l.record_id = p.record_id) "
                "ORDER BY p.id LIMIT %s)", (cutoff, chunk)).rowcount, retry=False)
            deleted += n
            if n < chunk:
                break
        self._call(lambda c: c.execute("DELETE FROM capture_batches AS b WHERE b.ts < %s AND NOT EXISTS "
                                       "(SELECT 1 FROM predictions AS p WHERE p.batch = b.id)", (cutoff,)), retry=False)
        return deleted

    # -- reads -------------------------------------------------------------------------------

    def known(self, model: str, record_ids: Sequence[str]) -> list[bool]:
        ids = list(record_ids)
        found = self._call(lambda c: _known(c, model, ids), retry=True)
        return [rid in found for rid in ids]

    def labels(self, model: str) -> list[LabelRow]:
        rows = self._call(lambda c: c.execute("SELECT record_id, label, reviewer, note, ts FROM labels WHERE model = %s ORDER BY id",
                                              (model,)).fetchall(), retry=True)
        return [LabelRow(*row) for row in rows]

    def predictions(self, model: str, *, role: str | None = None, version: int | None = None,
                    features: bool = True) -> Predictions:
        sql, params = predictions_query(model, role, version, features, "%s")
        rows = self._call(lambda c: c.execute(sql, params).fetchall(), retry=True)
        if features:
            rows = [(*r[:9], bytes(r[9])) for r in rows]
        return _columns(rows, features)

    def labelled(self, model: str, *, role: str = "champion") -> tuple[np.ndarray, np.ndarray, list[str]]:
        rows = self._call(lambda c: c.execute(
            """
            SELECT l.record_id, l.label, cap.n_features, cap.x FROM
              (SELECT DISTINCT ON (record_id) record_id, label, id AS lid FROM labels WHERE model = %(m)s
               ORDER BY record_id, id DESC) AS l
              CROSS JOIN LATERAL (SELECT b.n_features, p.x FROM predictions AS p JOIN capture_batches AS b ON b.id = p.batch
                                  WHERE p.record_id = l.record_id AND b.model = %(m)s AND b.role = %(r)s
                                  ORDER BY p.id DESC LIMIT 1) AS cap
            ORDER BY l.lid
            """, {"m": model, "r": role}).fetchall(), retry=True)
        ids = [r[0] for r in rows]
        y = np.array([1 if r[1] == ANOMALY else 0 for r in rows], dtype=np.int8)
        X = _stack([r[2] for r in rows], [bytes(r[3]) for r in rows]).astype(np.float64)
        return X, y, ids

    def quality_inputs(self, model: str, role: str = "champion") -> dict:
        """As :meth:`SQLiteStore.quality_inputs`."""
        def read(c: Any) -> tuple:
            row = c.execute("SELECT flagged, sampled, sampled_weight, sampled_no_rate FROM capture_totals WHERE model = %s AND role = %s",
                            (model, role)).fetchone() or (0, 0, 0.0, 0)
            rows = c.execute(
                """
                SELECT l.record_id,
                  (SELECT p.flags FROM predictions AS p JOIN capture_batches AS b ON b.id = p.batch
                     WHERE p.record_id = l.record_id AND b.model = %(m)s AND b.role = %(r)s ORDER BY p.id DESC LIMIT 1),
                  EXISTS (SELECT 1 FROM predictions AS p JOIN capture_batches AS b ON b.id = p.batch
                          WHERE p.record_id = l.record_id AND b.model = %(m)s)
                FROM (SELECT DISTINCT record_id FROM labels WHERE model = %(m)s) AS l
                """, {"m": model, "r": role}).fetchall()
            return row, rows

        row, rows = self._call(read, retry=True)
        captures, known = {}, set()
        for rid, flags, any_role in rows:
            captures[rid] = None if flags is None else (bool(flags & 1), bool(flags & 2))
            if any_role:
                known.add(rid)
        return {"captured_flagged": int(row[0]), "captured_sampled": int(row[1]), "sampled_weight": float(row[2]),
                "sampled_no_rate": int(row[3]), "captures": captures, "known": known}

    def unlabelled_alerts(self, model: str, *, since: float | None = None, limit: int = 100) -> Predictions:
        """As :meth:`SQLiteStore.unlabelled_alerts` (the review queue)."""
        rows = self._call(lambda c: c.execute(_UNLABELLED, (model, -math.inf if since is None else since, int(limit))).fetchall(),
                          retry=True)
        return _columns([(*r[:9], bytes(r[9])) for r in rows], True)

    def counts(self, model: str) -> dict[str, int]:
        """Rows stored for ``model``: ``predictions``, ``labels``."""
        def read(c: Any) -> dict[str, int]:
            return {"predictions": c.execute("SELECT COUNT(*) FROM predictions AS p JOIN capture_batches AS b ON b.id = p.batch "
                                             "WHERE b.model = %s", (model,)).fetchone()[0],
                    "labels": c.execute("SELECT COUNT(*) FROM labels WHERE model = %s", (model,)).fetchone()[0]}
        return self._call(read, retry=True)


def _known(conn: Any, model: str, ids: Sequence[str]) -> set[str]:
    return {r[0] for r in conn.execute(
        "SELECT DISTINCT p.record_id FROM predictions AS p JOIN capture_batches AS b ON b.id = p.batch "
        "WHERE p.record_id = ANY(%s) AND b.model = %s", (list(ids), model)).fetchall()}
