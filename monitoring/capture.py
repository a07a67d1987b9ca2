"""Prediction capture off the hot path: every flagged record and a random sample of the others.

The scoring path calls :meth:`CaptureWriter.offer` (or :meth:`CaptureWriter.offer_request`) with
references to what it already has (handle, ids, features, scores, flags): no selection, no copy, no
I/O, never a wait. Offers go to a bounded in-memory queue; one writer thread selects the rows to keep
(flagged ones, plus each other record with probability ``sample_rate``), decodes their features and
writes them to the :class:`~monitoring.store.Store` in short transactions, many offers per
transaction when it falls behind. When the queue is full (the store is slow or failing) an offer is
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
import queue
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from .store import Store, open_store

log = logging.getLogger("outlierd.capture")

DEFAULT_QUEUE_OFFERS = 4096      # offers (messages) waiting for the writer; beyond it, offers are dropped
MAX_OFFERS_PER_TXN = 512         # offers folded into one transaction when the writer is behind
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


@dataclass(frozen=True)
class _Offer:
    handle: Any                 # server.reload.ModelHandle (name, version, model.n_features)
    role: str
    ids: Sequence[str]          # one per record, or empty
    X: np.ndarray | None        # (n, d) features, or None: decode them from `req`
    req: Any                    # the ScoreRequest (features decoded in the writer thread), or None
    scores: np.ndarray
    flagged: np.ndarray
    latency_us: float
    request_id: int
    seq: int
    ts: float


class CaptureWriter:
    """Bounded, non-blocking capture of scored records into a store (see the module docstring).

    ``store`` is a :class:`Store`, or a :class:`StoreOpener` (opened lazily in the writer thread, so
    a server starts and scores even when its store cannot be opened). ``metrics`` is a
    :class:`~monitoring.metrics.ServiceMetrics` (``captured``, ``capture_dropped``) or None.
    """

    def __init__(self, store: Store | StoreOpener, *, sample_rate: float = 0.01, max_queue: int = DEFAULT_QUEUE_OFFERS,
                 metrics: Any = None, seed: int | None = None, token: str | None = None):
        if not 0.0 <= sample_rate <= 1.0:
            raise ValueError(f"capture sample rate must be in [0, 1]; got {sample_rate}")
        self._get_store: Callable[[], Store] = store.get if isinstance(store, StoreOpener) else (lambda: store)
        self.sample_rate = float(sample_rate)
        self.metrics = metrics
        self.token = token or secrets.token_hex(4)
        self._rng = np.random.default_rng(seed)
        self._queue: queue.Queue[_Offer] = queue.Queue(maxsize=max_queue)
        self._seq = itertools.count(1)  # next() is atomic under the GIL: offers may come from several threads
        self._stop = threading.Event()
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
        item = _Offer(handle, role, ids, X, req, scores, flagged, latency_us, request_id, next(self._seq), time.time())
        try:
            self._queue.put_nowait(item)
            return True
        except queue.Full:
            # the records this offer would have captured: every flagged one, the sample's expectation
            n = len(scores)
            f = int(np.count_nonzero(flagged))
            self._count_dropped(handle.name, f + int(round((n - f) * self.sample_rate)), "queue_full")
            return False

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
        """Wait until every offer so far is written or dropped; False on timeout."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.005)
        return True

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued (within ``timeout``), then stop the thread. A writer stuck in a
        store call is abandoned (it is a daemon thread)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("capture writer still busy after %.1fs; abandoning %d queued offers", timeout, self._queue.qsize())

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    # -- the writer thread ------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            try:
                first = self._queue.get(timeout=0.2)
            except queue.Empty:
                if self._stop.is_set():
                    return
                continue
            batch = [first]
            while len(batch) < MAX_OFFERS_PER_TXN:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            try:
                self._write(batch)
            except Exception as e:  # capture must never take the server down
                self._log_failure(e)
            finally:
                for _ in batch:
                    self._queue.task_done()

    def _select(self, o: _Offer) -> dict[str, Any] | None:
        flagged = np.asarray(o.flagged, dtype=bool)
        n = flagged.shape[0]
        sampled = ~flagged & (self._rng.random(n) < self.sample_rate) if self.sample_rate > 0 else np.zeros(n, dtype=bool)
        idx = np.flatnonzero(flagged | sampled)
        if idx.size == 0:
            return None
        d = o.handle.model.n_features
        if o.X is not None:
            X = np.asarray(o.X)[idx]
        elif len(o.req.raw_values):
            X = np.frombuffer(o.req.raw_values, dtype="<f4").reshape(-1, d)[idx]
        else:
            vals = o.req.values
            X = np.array([vals[i * d:(i + 1) * d] for i in idx], dtype=np.float32).reshape(idx.size, d)
        if len(o.ids):
            ids = [o.ids[int(i)] for i in idx]
        else:
            ids = [f"gen:{self.token}:{o.seq}:{o.request_id}:{int(i)}" for i in idx]
        return {"ids": ids, "X": X, "scores": np.asarray(o.scores, dtype=np.float64)[idx], "flagged": flagged[idx],
                "sampled": sampled[idx], "latency": np.full(idx.size, o.latency_us), "ts": np.full(idx.size, o.ts)}

    def _write(self, batch: list[_Offer]) -> None:
        groups: dict[tuple, list[dict[str, Any]]] = {}
        for o in batch:
            sel = self._select(o)
            if sel is not None:
                groups.setdefault((o.handle.name, o.handle.version, o.role), []).append(sel)
        for (model, version, role), parts in groups.items():
            n = sum(len(p["ids"]) for p in parts)
            try:
                store = self._get_store()
                cat = (lambda k: np.concatenate([p[k] for p in parts]))  # noqa: E731
                ids = [i for p in parts for i in p["ids"]]
                store.add_predictions(model, version, role, ids, np.concatenate([p["X"] for p in parts]).astype(np.float32, copy=False),
                                      cat("scores"), cat("flagged"), cat("sampled"), cat("latency"), cat("ts"),
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
