"""Prediction capture off the hot path: every flagged record and a random sample of the others.

Two steps, both cheap and never waiting. :meth:`CaptureWriter.select_batch` (the server calls it on
the scoring thread, right after the kernel) keeps every flagged record and each other one with
probability ``sample_rate``, copying them into a preallocated ring in one Numba call.
:meth:`CaptureWriter.attach` (on the event loop, when the response is built) queues what those
records share: ids, request id, the version that scored them, role, kernel time.
:meth:`CaptureWriter.offer` does both at once (shadow scoring, tests). One writer thread wakes every
100 ms and writes everything queued in a few transactions: to a :class:`~monitoring.store.Store`,
or (the server's default, :meth:`CaptureWriter.in_process`) to a child process that writes the
SQLite file (:mod:`monitoring.capture_proc`).

When the writer falls a whole ring behind, the queue is full or the store fails, records are dropped
and counted in ``outlierd_capture_dropped_total``: capture loses data before scoring waits.

NOTE: selection used to happen in the writer thread, over references to whole requests, and SQLite
ran in the server process. That thread held the GIL for tens of microseconds per message, and the
event loop, which needs the GIL for every message, waited behind it: capture cost 16-22% of
streaming throughput on 256-record messages (benchmarks/test_bench_capture.py); now about 9-10%.

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

from .store import Store, StoreOpener  # noqa: F401  (StoreOpener: callers import it from here too)

log = logging.getLogger("outlierd.capture")

DEFAULT_QUEUE_OFFERS = 8192      # messages with kept records waiting for the writer; beyond it, they are dropped
MAX_OFFERS_PER_TXN = 1024        # messages folded into one transaction
INTERVAL_S = 0.1                 # the writer wakes this often and takes everything queued
GAP_BLOCK = 1 << 16              # geometric gaps (distances between sampled records) drawn at once
RING_BYTES = 16 << 20            # kept records waiting for the writer, in bytes (features, score, flag, position)
ERROR_BACKOFF_S = 1.0            # after a failed write: the queue fills meanwhile, and offers are dropped
LOG_EVERY_S = 30.0               # rate limit of the "capture failing" log line


@nb.njit(cache=True)
def _keep_rows(X, scores, flagged, thr, sample, bounds, counts, st, head, gaps, r_X, r_score, r_flag, r_local):
    """Write the kept records of one or more scored messages (rows of ``X`` split at ``bounds``,
    the messages' end offsets; empty: one message) to the ring from ``head[0]`` (records ever
    written to it; the slot is ``head % capacity``, and ``head[0]`` moves past them), overwriting
    the oldest. A record is kept when flagged (``flagged[i]``, or
    ``scores[i] >= thr`` when ``flagged`` is empty) or sampled (``sample[i]``, or at the next
    geometric gap when ``sample`` is empty). ``counts[j]`` gets
    message j's kept records (written contiguously, message after message); ``r_local`` each
    record's position in its message; ``r_flag`` 1 (flagged) | 2 (at a sampled position).

    ``st``: int64 ``[next sampled position (from the first record), next gap]``. Returns
    ``(first, written, dropped, refill)``: first, the head position of the first written record;
    dropped, kept records beyond one ring's capacity; refill, the gaps are half used (draw new ones).
    Runs with the GIL held (no ``nogil``): a call is atomic with respect to other Python threads,
    which is what lets scoring threads call it without a lock."""
    n = scores.shape[0]
    cap = r_score.shape[0]
    use_thr = flagged.shape[0] == 0
    own_sample = sample.shape[0] == 0
    at, gi = st[0], st[1]
    first = head[0]
    written = 0
    dropped = 0
    j = 0
    start = 0
    n_msgs = bounds.shape[0]
    for m in range(n_msgs):
        counts[m] = 0
    for i in range(n):
        while n_msgs and i >= bounds[j]:
            start = bounds[j]
            j += 1
        if not own_sample:
            sampled = sample[i]
        else:
            sampled = i == at
        if own_sample and sampled:
            at += gaps[gi]
            gi += 1
            if gi == gaps.shape[0]:  # the caller refills long before; never read past the end
                gi = 0
        f = scores[i] >= thr if use_thr else flagged[i]
        if f or sampled:
            if written < cap:
                slot = (first + written) % cap
                r_X[slot, :] = X[i, :]
                r_score[slot] = scores[i]
                r_flag[slot] = (1 if f else 0) | (2 if sampled else 0)
                r_local[slot] = i - start
                if n_msgs:
                    counts[j] += 1
                written += 1
            else:
                dropped += 1
    if own_sample:  # a given sample leaves this writer's own sampler where it was
        st[0], st[1] = at - n, gi
    head[0] = first + written
    return first, written, dropped, gi >= gaps.shape[0] // 2


class _Ring:
    """Kept records of one feature width, in preallocated arrays (the bounded queue, in records)."""

    def __init__(self, d: int, capacity: int):
        # NOTE: filled, not just allocated: np.zeros/np.empty leave the pages unmapped, and the first
        # write to each page then faults on the scoring path (measured: a fresh ring made an offer
        # several times slower in the server until it had wrapped once)
        self.X = np.empty((capacity, d), dtype=np.float32)
        self.score = np.empty(capacity, dtype=np.float64)
        self.flag = np.empty(capacity, dtype=np.uint8)  # 1: flagged, 2: at a sampled position (either or both)
        self.local = np.empty(capacity, dtype=np.int64)
        for a in (self.X, self.score, self.flag, self.local):
            a.fill(0)
        self.ctl = np.zeros(1, dtype=np.int64)  # [head]: records ever written; moved by _keep_rows only
        self.capacity = capacity

    @property
    def head(self) -> int:
        return int(self.ctl[0])

    def intact(self, h0: int) -> bool:
        """Whether the records written from position ``h0`` on are still there (not overwritten)."""
        return int(self.ctl[0]) - h0 <= self.capacity


class Selection(NamedTuple):
    """Records of one scored message (or micro-batch) kept in the ring, not yet handed to the writer."""

    ring: _Ring
    h0: int                     # ring position (head) of the first record
    k: int                      # records kept


class _Kept(NamedTuple):
    # one message's kept records: where they lie in the ring, and what they share
    ring: _Ring
    h0: int
    k: int
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
    The writer wakes every ``interval_s`` and takes everything queued: few wake-ups and large
    transactions. ``ring_bytes`` bounds the kept records waiting for it (per feature width).
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

    def select(self, handle: Any, X: np.ndarray, scores: np.ndarray, flagged: np.ndarray,
               sample: np.ndarray | None = None) -> Selection | None:
        """Keep a scored message's flagged records and its sample: copied into the writer's ring now.
        ``sample``: the records to sample (a bool mask; default: this writer's own random sample).
        Returns where they are, for :meth:`attach`; None when nothing was kept."""
        sample = _NO_FLAGS if sample is None else np.asarray(sample, dtype=np.bool_)
        return self._select(handle, X, scores, np.asarray(flagged, dtype=np.bool_), 0.0, _NO_I64, sample)[0]

    def select_batch(self, handle: Any, X: np.ndarray, scores: np.ndarray, threshold: float,
                     sizes: Sequence[int]) -> list[Selection | None]:
        """:meth:`select` for a micro-batch of messages of ``sizes`` records (the server calls it on
        the scoring thread, right after the kernel), flagging ``scores >= threshold`` as the
        response does; one selection (or None) per message."""
        # NOTE: runs for every batch on a scoring thread right after the kernel, when the
        # interpreter's caches are cold: every Python step here measured several times its cost in
        # a quiet process, so there are few, and no lock (the Numba call is atomic under the GIL)
        thr = float(threshold)
        if scores.dtype.char == "f":  # as numpy compares a float32 array with a Python float
            thr = float(np.float32(thr))
        return self._select(handle, X, scores, _NO_FLAGS, thr, _NO_I64 if len(sizes) == 1 else np.cumsum(sizes), _NO_FLAGS)

    def _select(self, handle: Any, X: np.ndarray, scores: np.ndarray, flagged: np.ndarray, thr: float,
                bounds: np.ndarray, sample: np.ndarray) -> list[Selection | None]:
        ring = self._rings.get(X.shape[1]) or self._new_ring(X.shape[1])
        counts = np.zeros(bounds.shape[0], dtype=np.int64) if bounds.shape[0] else _NO_I64
        h0, k, lost, refill = _keep_rows(X, scores, flagged, thr, sample, bounds, counts, self._st, ring.ctl, self._gaps,
                                         ring.X, ring.score, ring.flag, ring.local)
        if refill:
            self._refill()
        if lost:  # more kept records in one call than the ring holds
            self._count_dropped(handle.name, lost, "queue_full")
        if not bounds.shape[0]:
            return [tuple.__new__(Selection, (ring, h0, k)) if k else None]  # the namedtuple without its __new__
        out: list[Selection | None] = []
        for c in counts.tolist():
            out.append(tuple.__new__(Selection, (ring, h0, c)) if c else None)
            h0 += c
        return out

    def _refill(self) -> None:
        with self._lock:
            if self._st[1] >= GAP_BLOCK // 2:  # not refilled by another thread meanwhile
                self._gaps = self._draw_gaps()
                self._st[1] = 0

    def sampled(self, sel: Selection | None, n: int) -> np.ndarray:
        """The records of a message of ``n`` that ``sel`` kept because they were sampled (not
        flagged), as a bool mask: shadow scoring captures the challenger's results at the same
        records, so the two roles' samples join (outlierd compare)."""
        mask = np.zeros(n, dtype=np.bool_)
        if sel is None:
            return mask
        ring = sel.ring
        with self._lock:
            if ring.intact(sel.h0):
                slots = np.arange(sel.h0, sel.h0 + sel.k) % ring.capacity
                picked = ring.local[slots][(ring.flag[slots] & 2) != 0]
                if ring.intact(sel.h0):  # not overwritten meanwhile (see _take)
                    mask[picked] = True
        return mask

    def attach(self, sel: Selection, handle: Any, role: str, ids: Sequence[str], request_id: int = 0,
               latency_us: float = float("nan")) -> bool:
        """Hand a selection to the writer with what its records share: ``handle`` (the version that
        scored them), ``role``, the message's ``ids`` (one per record, or empty: ids are generated),
        ``request_id``, kernel time per record. Returns False when the queue was full (counted)."""
        if len(self._queue) >= self.max_queue:
            self._count_dropped(handle.name, sel.k, "queue_full")
            return False
        if len(ids):
            ring = sel.ring
            with self._lock:
                if not ring.intact(sel.h0):
                    kid = None
                else:
                    s0 = sel.h0 % ring.capacity
                    loc = ring.local[s0:s0 + sel.k] if s0 + sel.k <= ring.capacity else ring.local[np.arange(sel.h0, sel.h0 + sel.k) % ring.capacity]
                    kid = [ids[i] for i in loc.tolist()]
            if kid is None:
                self._count_dropped(handle.name, sel.k, "queue_full")
                return False
            gen = (0, 0)
        else:
            kid, gen = None, (next(self._seq), request_id)
        self._queue.append(tuple.__new__(_Kept, (sel.ring, sel.h0, sel.k, handle, role, kid, gen, latency_us)))
        return True

    def offer(self, handle: Any, role: str, ids: Sequence[str], X: np.ndarray | None, scores: np.ndarray, flagged: np.ndarray,
              latency_us: float = float("nan"), request_id: int = 0, *, req: Any = None, sample: np.ndarray | None = None) -> bool:
        """:meth:`select` and :meth:`attach` in one step; never blocks.

        ``handle``: the ModelHandle that scored it; ``role``: "champion" or "challenger"; ``ids``: one
        per record or empty (ids are generated); ``X``: the (n, d) features as scored (or None with
        ``req``, a ScoreRequest, to decode them from); ``scores``, ``flagged``: (n,); ``latency_us``:
        kernel time per record (NaN: unknown); ``sample``: see :meth:`select`. The kept records
        (flagged ones and the sample) are copied into the writer's ring here, so nothing of the
        message is held afterwards. Returns False when the queue was full and kept records were
        dropped (counted)."""
        if X is None:
            X = _decode(req, handle.model.n_features)
        if len(self._queue) >= self.max_queue:  # decided before selecting, so the sample is not consumed
            kept = int(np.count_nonzero(flagged))
            self._count_dropped(handle.name, kept, "queue_full")
            return False
        sel = self.select(handle, X, scores, np.asarray(flagged, dtype=np.bool_), sample)
        if sel is None:
            return True
        return self.attach(sel, handle, role, ids, request_id, latency_us)

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

    def _take(self) -> list:
        """Up to MAX_OFFERS_PER_TXN queued messages with their records copied out of the ring, as
        ``(kept, rows of its ring, offset of its first record in them)``. A message whose records
        were overwritten meanwhile (the writer fell a whole ring behind) is counted as dropped."""
        with self._lock:
            q = self._queue
            batch = [q.popleft() for _ in range(min(len(q), MAX_OFFERS_PER_TXN))]
            if not batch:
                return []
            # the usual case: one ring, the messages back to back in it, none overwritten
            ring, end = batch[0].ring, batch[0].h0
            for kp in batch:
                if kp.ring is not ring or kp.h0 != end:
                    break
                end += kp.k
            else:
                if ring.intact(batch[0].h0):
                    pos = np.arange(batch[0].h0, end) % ring.capacity
                    rows = (len(batch), ring.X[pos], ring.score[pos], (ring.flag[pos] & 1) != 0, ring.local[pos])
                    # numpy may release the GIL while gathering, and scoring threads write the ring
                    # without a lock: only rows still not overwritten afterwards count
                    if ring.intact(batch[0].h0):
                        offsets = itertools.accumulate((kp.k for kp in batch[:-1]), initial=0)
                        return list(zip(batch, itertools.repeat(rows), offsets))
            return self._take_general(batch)

    def _take_general(self, batch: list[_Kept]) -> list:
        # under self._lock: several rings (feature widths), gaps, or overwritten messages
        lost = [kp for kp in batch if not kp.ring.intact(kp.h0)]
        batch = [kp for kp in batch if kp.ring.intact(kp.h0)]
        rows: dict[int, tuple] = {}
        for ring in {id(kp.ring): kp.ring for kp in batch}.values():
            mine = [kp for kp in batch if kp.ring is ring]
            pos = np.concatenate([np.arange(kp.h0, kp.h0 + kp.k) for kp in mine]) % ring.capacity
            rows[id(ring)] = (len(mine), ring.X[pos], ring.score[pos], (ring.flag[pos] & 1) != 0, ring.local[pos])
        if any(not kp.ring.intact(kp.h0) for kp in batch):  # overwritten while gathered (see _take)
            lost += batch
            batch, rows = [], {}
        for kp in lost:
            self._count_dropped(kp.handle.name, kp.k, "queue_full")
        out, at = [], {}
        for kp in batch:  # each message's rows: a slice of its ring's gathered rows, in queue order
            a = at.get(id(kp.ring), 0)
            at[id(kp.ring)] = a + kp.k
            out.append((kp, rows[id(kp.ring)], a))
        return out

    def _write(self, batch: list) -> None:
        # The records were selected and copied on the scoring path: here they are only grouped and stored.
        now = time.time()
        groups: dict[tuple, list] = {}
        for kp, rows, a in batch:
            groups.setdefault((kp.handle.name, kp.handle.version, kp.role, id(kp.ring)), []).append((kp, rows, a))
        for (model, version, role, _), members in groups.items():
            in_ring, X, score, flag, local = members[0][1]
            ks = [kp.k for kp, _r, _a in members]
            if len(members) != in_ring:  # other versions or roles share this ring's rows
                idx = np.concatenate([np.arange(a, a + kp.k) for kp, _r, a in members])
                X, score, flag, local = X[idx], score[idx], flag[idx], local[idx]
            lat = np.repeat([kp.latency_us for kp, _r, _a in members], ks)
            n = len(score)
            try:
                if self._process is not None:  # ids are made in the capture process, from these
                    self._process.add_captured(model, version, role, self.token, ks, [kp.ids for kp, _r, _a in members],
                                               [kp.gen for kp, _r, _a in members], X, score, flag, local, lat, now, self.sample_rate)
                    continue  # counted when the process answers
                ids: list[str] = []
                a = 0
                for kp, k in zip((m[0] for m in members), ks):
                    if kp.ids is not None:
                        ids.extend(kp.ids)
                    else:
                        seq, request_id = kp.gen
                        ids.extend([f"gen:{self.token}:{seq}:{request_id}:{i}" for i in local[a:a + k].tolist()])
                    a += k
                self._get_store().add_predictions(model, version, role, ids, X, score, flag, ~flag, lat, now, sample_rate=self.sample_rate)
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


def _decode(req: Any, d: int) -> np.ndarray:
    """A ScoreRequest's records as an (n, d) float32 array (the server passes its decoded ones)."""
    if req.raw_values:
        return np.frombuffer(req.raw_values, dtype="<f4").reshape(-1, d)
    return np.asarray(req.values, dtype=np.float32).reshape(-1, d)


_NO_FLAGS = np.zeros(0, dtype=np.bool_)  # _keep_rows: flag by threshold / draw the sample
_NO_I64 = np.zeros(0, dtype=np.int64)     # _keep_rows: one message


def _warm_up() -> None:
    """Compile (or load from the cache) _keep_rows for the arrays the server passes, before the first
    offer: a compilation on the event loop would stall it."""
    st, gaps, bounds, counts = np.zeros(2, np.int64), np.ones(4, np.int64), np.ones(1, np.int64), np.zeros(1, np.int64)
    ring = _Ring(1, 4)
    X = np.zeros((1, 1), np.float32)
    ro = np.frombuffer(b"\0\0\0\0", dtype="<f4").reshape(1, 1)  # raw_values decode to a read-only array
    for x in (X, ro):
        for scores in (np.zeros(1, np.float64), np.zeros(1, np.float32)):
            for flagged in (np.zeros(1, np.bool_), _NO_FLAGS):
                for sample in (np.zeros(1, np.bool_), _NO_FLAGS):
                    _keep_rows(x, scores, flagged, 0.0, sample, bounds, counts, st, ring.ctl, gaps, ring.X, ring.score, ring.flag, ring.local)
