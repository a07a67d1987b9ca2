"""Prediction capture off the hot path: every flagged record and a random sample of the others.

The scoring path calls :meth:`CaptureWriter.offer` (or :meth:`CaptureWriter.offer_request`) with
what it already has (handle, ids, features, scores, flags). The offer selects the records to keep
(every flagged one, plus each other record with probability ``sample_rate``) and copies just those:
a few microseconds, no I/O, never a wait. Kept records go to a bounded in-memory queue; one writer
thread wakes every 100 ms and writes everything queued to the :class:`~monitoring.store.Store` in a
few transactions.

NOTE: selection used to happen in the writer thread, over references to whole messages. That thread
then held the GIL for tens of microseconds per message (slicing features and ids out of requests,
freeing them), and the event loop, which needs the GIL for every message, waited behind it: capture
cost 16-22% of streaming throughput. Selecting on the scoring path costs the loop a few microseconds
per message, and the writer only concatenates and stores. When the queue is full (the store is slow or failing) an offer is
dropped and the records it would have captured are counted in ``outlierd_capture_dropped_total``:
capture loses data before scoring waits.

Records sent without ids get a generated id, ``gen:<worker token>:<sequence>:<request_id>:<index>``:
unique across workers and restarts (the token is random per writer) and stable once stored, but the
client never sees it, so such records cannot be labelled through the feedback API. Send ids.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import secrets
import threading
import time
from collections import deque
from typing import Any, Callable, NamedTuple, Sequence

import numba as nb
import numpy as np

from .store import Store, StoreOpener, open_store  # noqa: F401  (StoreOpener: imported from here too)

log = logging.getLogger("outlierd.capture")

DEFAULT_QUEUE_OFFERS = 8192      # messages with kept records waiting for the writer; beyond it, they are dropped
MAX_OFFERS_PER_TXN = 1024        # messages folded into one transaction
INTERVAL_S = 0.1                 # the writer wakes this often and takes everything queued
GAP_BLOCK = 1 << 16              # geometric gaps (distances between sampled records) drawn at once
RING_BYTES = 16 << 20            # kept records waiting for the writer, in bytes (features, score, flag, position)
ERROR_BACKOFF_S = 1.0            # after a failed write: the queue fills meanwhile, and offers are dropped
LOG_EVERY_S = 30.0               # rate limit of the "capture failing" log line


@nb.njit(cache=True)
def _keep_rows(X, scores, flagged, room, head, st, gaps, r_X, r_score, r_flag, r_local):
    """Append a message's kept records (flagged, or at a sampled position) to the ring at ``head``
    (records ever written to it; the slot is ``head % capacity``), at most ``room`` of them.

    ``st``: int64 ``[next sampled position (from this message's first record), next gap]``. Returns
    ``(written, dropped, refill)``, refill: the gaps are half used, draw new ones. Runs with the GIL
    held (no ``nogil``): a call is atomic with respect to other Python threads."""
    n = scores.shape[0]
    cap = r_score.shape[0]
    at, gi = st[0], st[1]
    written = 0
    dropped = 0
    for i in range(n):
        sampled = i == at
        if sampled:
            at += gaps[gi]
            gi += 1
            if gi == gaps.shape[0]:  # the caller refills long before; never read past the end
                gi = 0
        if flagged[i] or sampled:
            if written < room:
                slot = (head + written) % cap
                r_X[slot, :] = X[i, :]
                r_score[slot] = scores[i]
                r_flag[slot] = flagged[i]
                r_local[slot] = i
                written += 1
            else:
                dropped += 1
    st[0], st[1] = at - n, gi
    return written, dropped, gi >= gaps.shape[0] // 2


class _Ring:
    """Kept records of one feature width, in preallocated arrays (the bounded queue, in records)."""

    def __init__(self, d: int, capacity: int):
        # NOTE: filled, not just allocated: np.zeros/np.empty leave the pages unmapped, and the first
        # write to each page then faults on the scoring path (measured: a fresh ring made an offer
        # several times slower in the server until it had wrapped once)
        self.X = np.empty((capacity, d), dtype=np.float32)
        self.score = np.empty(capacity, dtype=np.float64)
        self.flag = np.empty(capacity, dtype=np.bool_)
        self.local = np.empty(capacity, dtype=np.int64)
        for a in (self.X, self.score, self.flag, self.local):
            a.fill(0)
        self.head = 0       # records ever written (offers hold the lock)
        self.tail = 0       # records taken by the writer
        self.capacity = capacity


class _Kept(NamedTuple):
    # one message's kept records: where they lie in the ring, and what they share
    ring: _Ring
    h0: int                     # ring position (head) of its first record
    k: int                      # records kept
    handle: Any                 # server.reload.ModelHandle (name, version, model.n_features)
    role: str
    ids: list[str] | None       # one per kept record, or None: generated from `gen`
    gen: tuple[int, int]        # (sequence, request_id) for generated ids
    latency_us: float


class CaptureWriter:
    """Bounded, non-blocking capture of scored records into a store (see the module docstring).

    ``store`` is a :class:`Store`, or a :class:`StoreOpener` (opened lazily in the writer thread, so
    a server starts and scores even when its store cannot be opened). ``metrics`` is a
    :class:`~monitoring.metrics.ServiceMetrics` (``captured``, ``capture_dropped``) or None.
    The writer wakes every ``interval_s`` and takes everything queued: few wake-ups, vectorised
    selection, large transactions, and little competition with the event loop for the GIL.
    """

    def __init__(self, store: Store | StoreOpener, *, sample_rate: float = 0.01, max_queue: int = DEFAULT_QUEUE_OFFERS,
                 metrics: Any = None, seed: int | None = None, token: str | None = None, interval_s: float = INTERVAL_S,
                 ring_bytes: int = RING_BYTES):
        if not 0.0 <= sample_rate <= 1.0:
            raise ValueError(f"capture sample rate must be in [0, 1]; got {sample_rate}")
        self._get_store: Callable[[], Store] = store.get if isinstance(store, StoreOpener) else (lambda: store)
        self._process: Any = None  # monitoring.capture_proc.ProcessStore: rows are counted when it answers
        self.sample_rate = float(sample_rate)
        self.metrics = metrics
        self.token = token or secrets.token_hex(4)
        self.max_queue = max_queue
        self.interval_s = interval_s
        self.ring_bytes = ring_bytes
        self._rng = np.random.default_rng(seed)
        # sampling state for _keep_rows; gaps: geometric, the distance between sampled records
        self._st = np.zeros(2, dtype=np.int64)
        self._gaps = self._draw_gaps()
        self._st[0] = self._gaps[0] - 1
        self._st[1] = 1
        self._rings: dict[int, _Ring] = {}
        self._lock = threading.Lock()  # offers (loop, shadow thread) against each other and the writer's take
        self._queue: deque[_Kept] = deque()
        self._seq = itertools.count(1)  # per message with generated ids
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._busy = False
        self._thread: threading.Thread | None = None
        self._last_log = -math.inf
        # totals in records (also in the metrics; kept here for callers without metrics)
        self.captured = 0
        self.dropped = 0

    # -- the hot path ----------------------------------------------------------------------------

    def offer(self, handle: Any, role: str, ids: Sequence[str], X: np.ndarray | None, scores: np.ndarray, flagged: np.ndarray,
              latency_us: float = float("nan"), request_id: int = 0, *, req: Any = None) -> bool:
        """Select what one scored message contributes and hand it to the writer; never blocks.

        ``handle``: the ModelHandle that scored it; ``role``: "champion" or "challenger"; ``ids``: one
        per record or empty (ids are generated); ``X``: the (n, d) features as scored (or None with
        ``req``, a ScoreRequest, to decode them from); ``scores``, ``flagged``: (n,); ``latency_us``:
        kernel time per record (NaN: unknown). The kept records (flagged ones and the sample) are
        copied into the writer's ring here, so nothing of the message is held afterwards. Returns
        False when the queue was full and kept records were dropped (counted)."""
        if X is None:
            X = _decode(req, handle.model.n_features)
        d = X.shape[1]
        ring = self._rings.get(d) or self._new_ring(d)
        # NOTE: this runs for every response on the event loop; written for the fewest Python steps
        with self._lock:
            h0 = ring.head
            room = ring.capacity - h0 + ring.tail if len(self._queue) < self.max_queue else 0
            k, lost, refill = _keep_rows(X, scores, flagged, room, h0, self._st, self._gaps, ring.X, ring.score, ring.flag, ring.local)
            if refill:
                self._gaps, self._st[1] = self._draw_gaps(), 0
            if k:
                ring.head = h0 + k
                if len(ids):
                    s0 = h0 % ring.capacity
                    loc = ring.local[s0:s0 + k].tolist() if s0 + k <= ring.capacity else ring.local[np.arange(h0, h0 + k) % ring.capacity].tolist()
                    kid, gen = [ids[i] for i in loc], (0, 0)
                else:
                    kid, gen = None, (next(self._seq), request_id)
                self._queue.append(tuple.__new__(_Kept, (ring, h0, k, handle, role, kid, gen, latency_us)))  # the namedtuple without its __new__
        if lost:
            self._count_dropped(handle.name, lost, "queue_full")
            return False
        return True

    def offer_request(self, handle: Any, role: str, req: Any, scores: np.ndarray, flagged: np.ndarray,
                      latency_us: float = float("nan")) -> bool:
        """:meth:`offer` for a ScoreRequest as received: ids, request_id and features come from it."""
        return self.offer(handle, role, req.ids, None, scores, flagged, latency_us, req.request_id, req=req)

    def prepare(self, n_features: int) -> None:
        """Allocate the ring for records of ``n_features`` now (at start, not on the first offer)."""
        self._new_ring(n_features)

    def _new_ring(self, d: int) -> _Ring:
        with self._lock:
            ring = self._rings.get(d)
            if ring is None:
                ring = self._rings[d] = _Ring(d, self._capacity(d))
            return ring

    def _capacity(self, d: int) -> int:
        return max(1024, self.ring_bytes // (4 * d + 17))

    def _draw_gaps(self) -> np.ndarray:
        if self.sample_rate <= 0:
            return np.full(GAP_BLOCK, 1 << 62, dtype=np.int64)
        return self._rng.geometric(self.sample_rate, GAP_BLOCK).astype(np.int64)

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self) -> "CaptureWriter":
        _warm_up()
        self._thread = threading.Thread(target=self._run, name="outlierd-capture", daemon=True)
        self._thread.start()
        return self

    @classmethod
    def in_process(cls, path: str | os.PathLike, **kw: Any) -> "CaptureWriter":
        """A writer whose store is the SQLite file ``path`` written by a child process
        (:mod:`monitoring.capture_proc`): the server's default, so SQLite never holds its GIL."""
        from .capture_proc import ProcessStore

        writer = cls(StoreOpener(path), **kw)  # the opener is never opened here: the child opens the file
        writer._process = ProcessStore(path, writer._on_result)
        writer._get_store = lambda: writer._process
        return writer

    def _on_result(self, model: str, role: str, n: int, error: str | None) -> None:
        # from the child's status reader: the outcome of one transaction
        if error is None:
            self.captured += n
            if self.metrics is not None:
                self.metrics.captured.labels(model, role).inc(n)
        else:
            self._count_dropped(model, n, "write_error")
            self._log_failure(OSError(error))

    def flush(self, timeout: float = 10.0) -> bool:
        """Wake the writer and wait until every offer so far is written or dropped; False on timeout."""
        deadline = time.monotonic() + timeout
        self._wake.set()
        while self._queue or self._busy:
            if time.monotonic() > deadline:
                return False
            self._wake.set()
            time.sleep(0.005)
        if self._process is not None:
            return self._process.sync(max(0.0, deadline - time.monotonic()))
        return True

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued (within ``timeout``), then stop the thread. A writer stuck in a
        store call is abandoned (it is a daemon thread)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("capture writer still busy after %.1fs; abandoning %d queued offers", timeout, len(self._queue))
        if self._process is not None:
            self._process.close(timeout)

    @property
    def queued(self) -> int:
        return len(self._queue)

    # -- the writer thread ------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            self._wake.wait(self.interval_s)
            self._wake.clear()
            stopping = self._stop.is_set()
            while self._queue:
                self._busy = True  # before taking anything: flush() must not see an empty queue and an idle writer
                try:
                    self._write(self._take())
                except Exception as e:  # capture must never take the server down
                    self._log_failure(e)
                self._busy = False
                time.sleep(0)  # between transactions, the event loop gets the GIL at once
            if stopping:
                return

    def _take(self) -> list[_Kept]:
        """Up to MAX_OFFERS_PER_TXN queued messages, their records copied out of the ring (which
        frees their slots). Records are written to the ring in queue order, so the taken ones are
        the oldest and the tail moves past them."""
        with self._lock:
            batch = []
            while self._queue and len(batch) < MAX_OFFERS_PER_TXN:
                batch.append(self._queue.popleft())
            rows: dict[int, tuple] = {}
            for ring in {id(kp.ring): kp.ring for kp in batch}.values():
                end = max(kp.h0 + kp.k for kp in batch if kp.ring is ring)
                pos = np.arange(ring.tail, end) % ring.capacity
                rows[id(ring)] = (ring.tail, ring.X[pos], ring.score[pos], ring.flag[pos], ring.local[pos])
                ring.tail = end
        return [(kp, rows[id(kp.ring)]) for kp in batch]  # type: ignore[misc]

    def _write(self, batch: list) -> None:
        # The records were selected and copied by offer(): here they are only grouped and stored.
        now = time.time()
        groups: dict[tuple, list] = {}
        for kp, rows in batch:
            groups.setdefault((kp.handle.name, kp.handle.version, kp.role, id(kp.ring)), []).append((kp, rows))
        for (model, version, role, _), members in groups.items():
            ids: list[str] = []
            sel: list[np.ndarray] = []
            lat: list[float] = []
            t0, X, score, flag, local = members[0][1]
            for kp, _rows in members:
                a = kp.h0 - t0
                sel.append(np.arange(a, a + kp.k))
                lat.append(kp.latency_us)
                if kp.ids is not None:
                    ids.extend(kp.ids)
                else:
                    seq, request_id = kp.gen
                    ids.extend([f"gen:{self.token}:{seq}:{request_id}:{i}" for i in local[a:a + kp.k].tolist()])
            idx = sel[0] if len(sel) == 1 else np.concatenate(sel)
            if len(members) != len(batch) or idx.size != score.size:
                X, score, flag = X[idx], score[idx], flag[idx]
            n = len(ids)
            try:
                store = self._get_store()
                store.add_predictions(model, version, role, ids, X, score, flag, ~flag, np.repeat(lat, [kp.k for kp, _ in members]), now,
                                      sample_rate=self.sample_rate)
            except Exception as e:
                self._count_dropped(model, n, "write_error")
                self._log_failure(e)
                self._stop.wait(ERROR_BACKOFF_S)
                continue
            if self._process is None:  # the child process's rows are counted when it answers
                self.captured += n
                if self.metrics is not None:
                    self.metrics.captured.labels(model, role).inc(n)

    def _count_dropped(self, model: str, n: int, reason: str) -> None:
        if n <= 0:
            return
        self.dropped += n
        if self.metrics is not None:
            self.metrics.capture_dropped.labels(model, reason).inc(n)

    def _log_failure(self, e: BaseException) -> None:
        now = time.monotonic()
        if now - self._last_log >= LOG_EVERY_S:
            self._last_log = now
            log.error("capture write failed; records are dropped until the store works again error=%s", e)


def _decode(req: Any, d: int) -> np.ndarray:
    """A ScoreRequest's records as an (n, d) float32 array (the server passes its decoded ones)."""
    if req.raw_values:
        return np.frombuffer(req.raw_values, dtype="<f4").reshape(-1, d)
    return np.asarray(req.values, dtype=np.float32).reshape(-1, d)


def _warm_up() -> None:
    """Compile (or load from the cache) _keep_rows for the arrays the server passes, before the first
    offer: a compilation on the event loop would stall it."""
    st, gaps = np.zeros(2, np.int64), np.ones(4, np.int64)
    ring = _Ring(1, 4)
    X = np.zeros((1, 1), np.float32)
    ro = np.frombuffer(b"\0\0\0\0", dtype="<f4").reshape(1, 1)  # raw_values decode to a read-only array
    for x in (X, ro):
        for scores in (np.zeros(1, np.float64), np.zeros(1, np.float32)):
            _keep_rows(x, scores, np.zeros(1, np.bool_), 0, 0, st, gaps, ring.X, ring.score, ring.flag, ring.local)
