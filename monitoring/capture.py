"""Prediction capture off the hot path: every flagged record and a random sample of the others.

The scoring path calls :meth:`CaptureWriter.offer` (or :meth:`CaptureWriter.offer_request`) with
references to what it already has (handle, ids, features, scores, flags): no selection, no copy, no
I/O, never a wait, no lock. Offers go to a bounded in-memory queue; one writer thread wakes every
100 ms, selects the rows to keep from everything queued (flagged ones, plus each other record with
probability ``sample_rate``), decodes their features and writes them to the
:class:`~monitoring.store.Store` in a few short transactions. When the queue is full (the store is slow or failing) an offer is
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

import numpy as np

from .store import Store, open_store

log = logging.getLogger("outlierd.capture")

DEFAULT_QUEUE_OFFERS = 8192      # offers (messages) waiting for the writer; beyond it, offers are dropped
MAX_OFFERS_PER_TXN = 512         # offers folded into one transaction (the GIL is released between transactions)
INTERVAL_S = 0.1                 # the writer wakes this often and takes everything queued
YIELD_EVERY = 64                 # messages decoded between voluntary GIL releases of the writer
ERROR_BACKOFF_S = 1.0            # after a failed write: the queue fills meanwhile, and offers are dropped
LOG_EVERY_S = 30.0               # rate limit of the "capture failing" log line


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
                raise OSError(f"feedback store {self.path} unavailable: {self._error}")
            try:
                self._store = self._opener(self.path)
            except Exception as e:
                self._error, self._failed_at = e, time.monotonic()
                raise OSError(f"feedback store {self.path} unavailable: {e}") from e
            return self._store

    def close(self) -> None:
        with self._lock:
            if self._store is not None:
                self._store.close()
                self._store = None


class _Offer(NamedTuple):
    # a tuple: built on the scoring path for every message, so as cheap as Python allows
    handle: Any                 # server.reload.ModelHandle (name, version, model.n_features)
    role: str
    ids: Sequence[str]          # one per record, or empty
    X: np.ndarray | None        # (n, d) features, or None: decode them from `req`
    req: Any                    # the ScoreRequest (features decoded in the writer thread), or None
    scores: np.ndarray
    flagged: np.ndarray
    latency_us: float
    request_id: int


class CaptureWriter:
    """Bounded, non-blocking capture of scored records into a store (see the module docstring).

    ``store`` is a :class:`Store`, or a :class:`StoreOpener` (opened lazily in the writer thread, so
    a server starts and scores even when its store cannot be opened). ``metrics`` is a
    :class:`~monitoring.metrics.ServiceMetrics` (``captured``, ``capture_dropped``) or None.
    The writer wakes every ``interval_s`` and takes everything queued: few wake-ups, vectorised
    selection, large transactions, and little competition with the event loop for the GIL.
    """

    def __init__(self, store: Store | StoreOpener, *, sample_rate: float = 0.01, max_queue: int = DEFAULT_QUEUE_OFFERS,
                 metrics: Any = None, seed: int | None = None, token: str | None = None, interval_s: float = INTERVAL_S):
        if not 0.0 <= sample_rate <= 1.0:
            raise ValueError(f"capture sample rate must be in [0, 1]; got {sample_rate}")
        self._get_store: Callable[[], Store] = store.get if isinstance(store, StoreOpener) else (lambda: store)
        self.sample_rate = float(sample_rate)
        self.metrics = metrics
        self.token = token or secrets.token_hex(4)
        self.max_queue = max_queue
        self.interval_s = interval_s
        self._rng = np.random.default_rng(seed)
        # deque.append / popleft are atomic: no lock and no wake-up of the writer per message
        self._queue: deque[_Offer] = deque()
        self._seq = itertools.count(1)  # per message with generated ids (writer thread only)
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
        """Hand one scored message to the writer; never blocks, never copies.

        ``handle``: the ModelHandle that scored it; ``role``: "champion" or "challenger"; ``ids``: one
        per record or empty (ids are generated); ``X``: the (n, d) features as scored (or None with
        ``req``, a ScoreRequest, to decode them in the writer thread); ``scores``, ``flagged``: (n,);
        ``latency_us``: kernel time per record (NaN: unknown). The arrays must not be modified
        afterwards. Returns False when the queue was full and the offer was dropped (counted)."""
        if len(self._queue) >= self.max_queue:
            # the records this offer would have captured: every flagged one, the sample's expectation
            n = len(scores)
            f = int(np.count_nonzero(flagged))
            self._count_dropped(handle.name, f + int(round((n - f) * self.sample_rate)), "queue_full")
            return False
        self._queue.append(_Offer(handle, role, ids, X, req, scores, flagged, latency_us, request_id))
        return True

    def offer_request(self, handle: Any, role: str, req: Any, scores: np.ndarray, flagged: np.ndarray,
                      latency_us: float = float("nan")) -> bool:
        """:meth:`offer` for a ScoreRequest as received: ids, request_id and features come from it."""
        return self.offer(handle, role, req.ids, None, scores, flagged, latency_us, req.request_id, req=req)

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self) -> "CaptureWriter":
        self._thread = threading.Thread(target=self._run, name="outlierd-capture", daemon=True)
        self._thread.start()
        return self

    def flush(self, timeout: float = 10.0) -> bool:
        """Wake the writer and wait until every offer so far is written or dropped; False on timeout."""
        deadline = time.monotonic() + timeout
        self._wake.set()
        while self._queue or self._busy:
            if time.monotonic() > deadline:
                return False
            self._wake.set()
            time.sleep(0.005)
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
                batch = []
                while self._queue and len(batch) < MAX_OFFERS_PER_TXN:
                    batch.append(self._queue.popleft())
                try:
                    self._write(batch)
                except Exception as e:  # capture must never take the server down
                    self._log_failure(e)
                self._busy = False
                time.sleep(0)  # between transactions, the event loop gets the GIL at once
            if stopping:
                return

    def _write(self, batch: list[_Offer]) -> None:
        # Vectorised over the whole batch: one random draw, one pass to find the kept rows; Python
        # only loops over the messages that keep a row (to decode their features and ids).
        now = time.time()
        flags = [o.flagged for o in batch]
        sizes = np.fromiter(map(len, flags), dtype=np.int64, count=len(flags))
        F = np.concatenate(flags).astype(bool, copy=False) if flags else np.zeros(0, dtype=bool)
        S = ~F & (self._rng.random(F.size) < self.sample_rate) if self.sample_rate > 0 else np.zeros(F.size, dtype=bool)
        kept = np.flatnonzero(F | S)
        if kept.size == 0:
            return
        ends = np.cumsum(sizes)
        owner = np.searchsorted(ends, kept, side="right")  # the message each kept row belongs to
        local = kept - (ends - sizes)[owner]
        scores = np.concatenate([np.asarray(o.scores, dtype=np.float64).reshape(-1) for o in batch])[kept]
        latency = np.fromiter((o.latency_us for o in batch), dtype=np.float64, count=len(batch))[owner]
        cuts = [0, *(np.flatnonzero(np.diff(owner)) + 1).tolist(), kept.size]
        groups: dict[tuple, dict[str, Any]] = {}
        for k, (a, b) in enumerate(zip(cuts[:-1], cuts[1:])):
            if k % YIELD_EVERY == YIELD_EVERY - 1:
                time.sleep(0)  # let the event loop have the GIL now rather than after the 5 ms switch interval
            o = batch[int(owner[a])]
            li = local[a:b].tolist()
            key = (o.handle.name, o.handle.version, o.role)
            g = groups.get(key)
            if g is None:
                g = groups[key] = {"ids": [], "blobs": [], "spans": [], "d": o.handle.model.n_features}
            rb = 4 * g["d"]
            # each kept record's features as little-endian float32 bytes, sliced straight from the request
            if o.X is not None:
                X = np.ascontiguousarray(o.X, dtype="<f4")
                g["blobs"].extend([X[i].tobytes() for i in li])
            else:
                raw = o.req.raw_values  # a bytes field: each access is a copy, so once
                if raw:
                    g["blobs"].extend([raw[i * rb:(i + 1) * rb] for i in li])
                else:
                    vals, d = o.req.values, g["d"]
                    g["blobs"].extend([np.array(vals[i * d:(i + 1) * d], dtype="<f4").tobytes() for i in li])
            if len(o.ids):
                g["ids"].extend([o.ids[i] for i in li])
            else:
                seq = next(self._seq)
                g["ids"].extend([f"gen:{self.token}:{seq}:{o.request_id}:{i}" for i in li])
            g["spans"].append((a, b))
        for (model, version, role), g in groups.items():
            sel = slice(None) if len(groups) == 1 else np.concatenate([np.arange(a, b) for a, b in g["spans"]])
            rows = kept[sel]
            n = rows.size
            try:
                store = self._get_store()
                X = np.frombuffer(b"".join(g["blobs"]), dtype="<f4").reshape(n, g["d"])
                store.add_predictions(model, version, role, g["ids"], X, scores[sel], F[rows], S[rows], latency[sel], now,
                                      sample_rate=self.sample_rate)
            except Exception as e:
                self._count_dropped(model, n, "write_error")
                self._log_failure(e)
                self._stop.wait(ERROR_BACKOFF_S)
                continue
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
