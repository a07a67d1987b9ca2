"""Prediction capture off the hot path: every flagged record and a random sample of the others.

:meth:`CaptureWriter.capture_batch` (the server calls it on the scoring thread, once a batch's answer
is on its way to the event loop) keeps every flagged record and each other one with probability
``sample_rate``, copying them into a preallocated ring in one Numba call, and queues the batch with
what its records share (the version that scored them, role, kernel time, each message's ids and
request id) in one append. :meth:`CaptureWriter.offer` does the same for one message whose flags are
given (shadow scoring, tests). One writer thread wakes every 100 ms, splits what is queued by
message, looks the ids up and writes it all in a few transactions: to a
:class:`~monitoring.store.Store`, or (the server's default, :meth:`CaptureWriter.in_process`) to a
child process that writes the SQLite file (:mod:`monitoring.capture_proc`).

When the writer falls a whole ring behind, the queue is full or the store fails, records are dropped
and counted in ``outlierd_capture_dropped_total``: capture loses data before scoring waits.

NOTE: selection used to happen in the writer thread, over references to whole requests, and SQLite
ran in the server process. That thread held the GIL for tens of microseconds per message, and the
event loop, which needs the GIL for every message, waited behind it: capture cost 16-22% of
streaming throughput on 256-record messages (benchmarks/test_bench_capture.py). Then selection
moved to the scoring thread (before the answer, with the event loop attaching ids per message) and
SQLite to a child process: about 10%. Now the scoring thread makes one 8-argument Numba call and one
append per batch, after the answer; everything per message happens in the writer thread: about 8%
on 256-record messages, 2-5% on 4,096-record ones. Selecting in the writer thread instead (one append
on the scoring thread) measured worse: its GIL bursts every 100 ms delay the event loop more.

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
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numba as nb
import numpy as np

from outlierd.core.errors import InvalidInputError

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
def _keep_rows(X, scores, thr, marks, ctl, gaps, r_X, r_meta):
    """Copy the kept records of a scored batch to the ring, from its head ``ctl[0]`` (records ever
    written to it; the slot is ``head % capacity``), overwriting the oldest, and move the head past
    them. A record is kept when flagged (``scores[i] >= thr``; with ``marks``, bit 1 of
    ``marks[i]``) or sampled (at the next geometric gap, the ring's sampler being ``ctl[1]``, the
    next sampled position from the first record, and ``ctl[2]``, the next gap in ``gaps``; when
    ``marks[0]`` has bit 4, bit 2 of ``marks[i]`` instead). ``r_meta[slot]`` gets ``(score,
    1 flagged | 2 sampled, position in the batch)``.

    Returns ``(head before, records written)``; written comes back as ``-1 - written`` when the
    caller has work to do: the gaps are half used (draw new ones), or kept records went beyond one
    ring's capacity (``ctl[3]`` counts them). Runs with the GIL held (no ``nogil``): a call is
    atomic with respect to other Python threads, which is what lets scoring threads call it
    without a lock."""
    n = scores.shape[0]
    cap = r_meta.shape[0]
    given = marks.shape[0] > 0
    own_sample = not given or (marks[0] & 4) == 0
    at, gi = ctl[1], ctl[2]
    first = ctl[0]
    written = 0
    dropped = 0
    for i in range(n):
        if own_sample:
            sampled = i == at
            if sampled:
                at += gaps[gi]
                gi += 1
                if gi == gaps.shape[0]:  # the caller refills long before; never read past the end
                    gi = 0
        else:
            sampled = (marks[i] & 2) != 0
        f = (marks[i] & 1) != 0 if given else scores[i] >= thr
        if f or sampled:
            if written < cap:
                slot = (first + written) % cap
                r_X[slot, :] = X[i, :]
                r_meta[slot, 0] = scores[i]
                r_meta[slot, 1] = (1 if f else 0) | (2 if sampled else 0)
                r_meta[slot, 2] = i
                written += 1
            else:
                dropped += 1
    if own_sample:  # a given sample leaves the ring's sampler where it was
        ctl[1], ctl[2] = at - n, gi
    ctl[0] = first + written
    if dropped or gi >= gaps.shape[0] // 2:
        ctl[3] += dropped
        return first, -1 - written
    return first, written


class _Ring:
    """Kept records of one feature width, in preallocated arrays (the bounded queue, in records),
    and the sampler that picks them."""

    def __init__(self, d: int, capacity: int, gaps: np.ndarray):
        # NOTE: filled, not just allocated: np.zeros/np.empty leave the pages unmapped, and the first
        # write to each page then faults on the scoring path (measured: a fresh ring made an offer
        # several times slower in the server until it had wrapped once)
        self.X = np.empty((capacity, d), dtype=np.float32)
        self.meta = np.empty((capacity, 3), dtype=np.float64)  # score, flag (1 flagged | 2 sampled), position in its batch
        for a in (self.X, self.meta):
            a.fill(0)
        # [head (records ever written), next sampled position, next gap, dropped]: moved by _keep_rows only
        self.ctl = np.zeros(4, dtype=np.int64)
        self.gaps = gaps  # geometric: the distance between sampled records
        self.ctl[1] = gaps[0] - 1
        self.ctl[2] = 1
        self.capacity = capacity

    def intact(self, h0: int) -> bool:
        """Whether the records written from position ``h0`` on are still there (not overwritten)."""
        return int(self.ctl[0]) - h0 <= self.capacity


class Selection(NamedTuple):
    """Records of one scored batch kept in the ring; ``start``: the position in that batch of the
    message a hook is given it for (see :meth:`CaptureWriter.sampled`)."""

    ring: _Ring
    h0: int                     # ring position (head) of the first record
    k: int                      # records kept
    start: int = 0


class _Kept(NamedTuple):
    # one scored batch's kept records: where they lie in the ring, and what they share
    ring: _Ring
    h0: int
    k: int
    handle: Any                 # server.reload.ModelHandle (name, version, model.n_features)
    role: str
    msgs: Sequence[Sequence]    # per message of the batch: (ids, request_id, ...); ids one per record, or empty
    sizes: Sequence[int] | None  # the messages' record counts (None: one message)
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
            raise InvalidInputError(f"capture sample rate must be in [0, 1]; got {sample_rate}")
        self._get_store: Callable[[], Store] = store.get if isinstance(store, StoreOpener) else (lambda: store)
        self._process: Any = None  # monitoring.capture_proc.ProcessStore: rows are counted when it answers
        self.sample_rate = float(sample_rate)
        self.metrics = metrics
        self.token = token or secrets.token_hex(4)
        self.max_queue = max_queue
        self.interval_s = interval_s
        self.ring_bytes = ring_bytes
        self._rng = np.random.default_rng(seed)
        self._rings: dict[int, _Ring] = {}
        self._lock = threading.Lock()  # rings' creation and refills, sampled(), the writer's take
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
        self.pruned = 0  # predictions deleted by the capture process's retention

    # -- the hot path ----------------------------------------------------------------------------

    def capture_batch(self, handle: Any, role: str, X: np.ndarray, scores: np.ndarray, threshold: float,
                      msgs: Sequence[Sequence], sizes: Sequence[int] | None = None, latency_us: float = float("nan")) -> Selection | None:
        """Keep a scored batch's flagged records (``scores >= threshold``, as the response flags
        them) and this writer's sample: copied into the ring now and queued for the writer with
        what they share, in one Numba call and one append (the server calls this on the scoring
        thread, after the answer). ``handle``: the ModelHandle that scored them; ``role``:
        "champion" or "challenger"; ``msgs``: per message of the batch, ``(ids, request_id, ...)``
        (ids: one per record, or empty: generated); ``sizes``: the messages' record counts (None:
        one message); ``latency_us``: kernel time per record. Returns where the kept records lie
        (for :meth:`sampled`), or None when none was kept. Never blocks: a full queue drops
        (counted)."""
        # NOTE: every Python step here costs several times its quiet-process cost on a scoring
        # thread right after the kernel (cold caches: a no-op 14-argument Numba call measured 7 us
        # there), so there are few: the messages are told apart and their ids looked up later, in
        # the writer thread
        thr = float(threshold)
        if scores.dtype.char == "f":  # as numpy compares a float32 array with a Python float
            thr = float(np.float32(thr))
        ring = self._rings.get(X.shape[1]) or self._new_ring(X.shape[1])
        h0, k = _keep_rows(X, scores, thr, _NO_MARKS, ring.ctl, ring.gaps, ring.X, ring.meta)
        if k < 0:
            k = self._settle(ring, handle, k)
        if not k:
            return None
        if len(self._queue) >= self.max_queue:
            self._count_dropped(handle.name, k, "queue_full")
            return None
        self._queue.append(tuple.__new__(_Kept, (ring, h0, k, handle, role, msgs, sizes, latency_us)))
        return tuple.__new__(Selection, (ring, h0, k, 0))

    def offer(self, handle: Any, role: str, ids: Sequence[str], X: np.ndarray | None, scores: np.ndarray, flagged: np.ndarray,
              latency_us: float = float("nan"), request_id: int = 0, *, req: Any = None, sample: np.ndarray | None = None) -> bool:
        """Capture one scored message whose flags are given (shadow scoring, tests); never blocks.

        ``handle``: the ModelHandle that scored it; ``role``: "champion" or "challenger"; ``ids``: one
        per record or empty (ids are generated); ``X``: the (n, d) features as scored (or None with
        ``req``, a ScoreRequest, to decode them from); ``scores``, ``flagged``: (n,); ``latency_us``:
        kernel time per record (NaN: unknown); ``sample``: the records to sample (a bool mask;
        default: this writer's own random sample). The kept records (flagged ones and the sample)
        are copied into the writer's ring here, so nothing of the message is held afterwards but
        its ids. Returns False when the queue was full and kept records were dropped (counted)."""
        if X is None:
            X = _decode(req, handle.model.n_features)
        if len(self._queue) >= self.max_queue:  # decided before selecting, so the sample is not consumed
            self._count_dropped(handle.name, int(np.count_nonzero(flagged)), "queue_full")
            return False
        marks: np.ndarray = np.asarray(flagged, dtype=np.uint8)  # stays uint8 (NEP 50), whatever the stubs infer
        if sample is not None:
            marks = marks | (np.asarray(sample, dtype=np.uint8) << 1) | 4
        ring = self._rings.get(X.shape[1]) or self._new_ring(X.shape[1])
        h0, k = _keep_rows(X, scores, 0.0, marks, ring.ctl, ring.gaps, ring.X, ring.meta)
        if k < 0:
            k = self._settle(ring, handle, k)
        if k:
            self._queue.append(tuple.__new__(_Kept, (ring, h0, k, handle, role, ((ids, request_id),), None, latency_us)))
        return True

    def offer_request(self, handle: Any, role: str, req: Any, scores: np.ndarray, flagged: np.ndarray,
                      latency_us: float = float("nan")) -> bool:
        """:meth:`offer` for a ScoreRequest as received: ids, request_id and features come from it."""
        return self.offer(handle, role, req.ids, None, scores, flagged, latency_us, req.request_id, req=req)

    def _settle(self, ring: _Ring, handle: Any, k: int) -> int:
        # _keep_rows asked for work: refill the gaps, count records beyond the ring's capacity
        with self._lock:
            lost = int(ring.ctl[3])
            ring.ctl[3] = 0
            if ring.ctl[2] >= GAP_BLOCK // 2:  # not refilled by another thread meanwhile
                ring.gaps = self._draw_gaps()
                ring.ctl[2] = 0
        if lost:  # more kept records in one call than the ring holds
            self._count_dropped(handle.name, lost, "queue_full")
        return -1 - k

    def sampled(self, sel: Selection | None, n: int) -> np.ndarray:
        """The records of a message of ``n`` (at ``sel.start`` in its batch) that ``sel`` kept
        because they were sampled (not flagged), as a bool mask: shadow scoring captures the
        challenger's results at the same records, so the two roles' samples join (outlierd
        compare)."""
        mask = np.zeros(n, dtype=np.bool_)
        if sel is None:
            return mask
        ring = sel.ring
        with self._lock:
            if ring.intact(sel.h0):
                meta = ring.meta[np.arange(sel.h0, sel.h0 + sel.k) % ring.capacity]
                pos = meta[:, 2].astype(np.int64) - sel.start
                picked = pos[((meta[:, 1].astype(np.int64) & 2) != 0) & (pos >= 0) & (pos < n)]
                if ring.intact(sel.h0):  # not overwritten meanwhile (see _take)
                    mask[picked] = True
        return mask

    def prepare(self, n_features: int) -> None:
        """Allocate the ring for records of ``n_features`` now (at start, not on the first offer)."""
        self._new_ring(n_features)

    def _new_ring(self, d: int) -> _Ring:
        with self._lock:
            ring = self._rings.get(d)
            if ring is None:
                ring = self._rings[d] = _Ring(d, self._capacity(d), self._draw_gaps())
            return ring

    def _capacity(self, d: int) -> int:
        return max(1024, self.ring_bytes // (4 * d + 24))

    def _draw_gaps(self) -> np.ndarray:
        if self.sample_rate <= 0:
            return np.full(GAP_BLOCK, 1 << 62, dtype=np.int64)
        return self._rng.geometric(self.sample_rate, GAP_BLOCK).astype(np.int64)

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self) -> CaptureWriter:
        _warm_up()
        self._thread = threading.Thread(target=self._run, name="outlierd-capture", daemon=True)
        self._thread.start()
        return self

    @classmethod
    def in_process(cls, path: str | os.PathLike, *, retention: Any = None, **kw: Any) -> CaptureWriter:
        """A writer whose store is the SQLite file ``path`` written by a child process
        (:mod:`monitoring.capture_proc`): the server's default, so SQLite never holds its GIL.
        ``retention``: a :class:`~monitoring.capture_proc.Retention` the child enforces."""
        from .capture_proc import ProcessStore

        writer = cls(StoreOpener(path), **kw)  # the opener is never opened here: the child opens the file
        writer._process = ProcessStore(path, writer._on_result, retention=retention, on_pruned=writer._on_pruned)
        return writer

    def _on_pruned(self, n: int) -> None:
        self.pruned += n
        if self.metrics is not None:
            self.metrics.capture_pruned.inc(n)

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
        """Up to MAX_OFFERS_PER_TXN queued batches with their records copied out of the ring, as
        ``(kept, rows of its ring, offset of its first record in them)``. A batch whose records
        were overwritten meanwhile (the writer fell a whole ring behind) is counted as dropped."""
        with self._lock:
            q = self._queue
            batch = [q.popleft() for _ in range(min(len(q), MAX_OFFERS_PER_TXN))]
            if not batch:
                return []
            # the usual case: one ring, the batches back to back in it (in ring order: two scoring
            # threads may append in the other order), none overwritten
            ring = batch[0].ring
            if all(kp.ring is ring for kp in batch):
                batch.sort(key=_by_head)
                end = batch[0].h0
                for kp in batch:
                    if kp.h0 != end:
                        break
                    end += kp.k
                else:
                    if ring.intact(batch[0].h0):
                        pos = np.arange(batch[0].h0, end) % ring.capacity
                        rows = (len(batch), ring.X[pos], ring.meta[pos])
                        # numpy may release the GIL while gathering, and scoring threads write the ring
                        # without a lock: only rows still not overwritten afterwards count
                        if ring.intact(batch[0].h0):
                            offsets = itertools.accumulate((kp.k for kp in batch[:-1]), initial=0)
                            return list(zip(batch, itertools.repeat(rows), offsets))
            return self._take_general(batch)

    def _take_general(self, batch: list[_Kept]) -> list:
        # under self._lock: several rings (feature widths), gaps, or overwritten batches
        lost = [kp for kp in batch if not kp.ring.intact(kp.h0)]
        batch = [kp for kp in batch if kp.ring.intact(kp.h0)]
        rows: dict[int, tuple] = {}
        for ring in {id(kp.ring): kp.ring for kp in batch}.values():
            mine = [kp for kp in batch if kp.ring is ring]
            pos = np.concatenate([np.arange(kp.h0, kp.h0 + kp.k) for kp in mine]) % ring.capacity
            rows[id(ring)] = (len(mine), ring.X[pos], ring.meta[pos])
        if any(not kp.ring.intact(kp.h0) for kp in batch):  # overwritten while gathered (see _take)
            lost += batch
            batch, rows = [], {}
        for kp in lost:
            self._count_dropped(kp.handle.name, kp.k, "queue_full")
        out = []
        at: dict[int, int] = {}  # id(ring) -> rows of it handed out so far
        for kp in batch:  # each batch's rows: a slice of its ring's gathered rows, in queue order
            a = at.get(id(kp.ring), 0)
            at[id(kp.ring)] = a + kp.k
            out.append((kp, rows[id(kp.ring)], a))
        return out

    def _messages(self, members: list, pos: np.ndarray) -> tuple[list, list, list, list, np.ndarray]:
        """Split the kept records of ``members`` (``(kept, rows, offset)``; records in order, at
        batch positions ``pos``) by message: ``(ks, ids, gen, latency per message, positions in
        their messages)``, one entry per message with kept records; ids None: generated from
        ``gen = (sequence, request_id)``."""
        local = pos.copy()
        ks: list[int] = []
        ids: list[list[str] | None] = []
        gen: list[tuple[int, int]] = []
        lat: list[float] = []
        a = 0
        for kp, _rows, _a in members:
            if kp.sizes is None:
                split: list[tuple[int, int]] = [(0, kp.k)]
            else:
                ends = np.cumsum(kp.sizes)
                j = np.searchsorted(ends, pos[a:a + kp.k], side="right")
                local[a:a + kp.k] -= (ends - np.asarray(kp.sizes))[j]
                split = [(m, c) for m, c in enumerate(np.bincount(j, minlength=len(kp.sizes)).tolist()) if c]
            o = a
            for m, c in split:
                msg_ids, request_id = kp.msgs[m][0], kp.msgs[m][1]
                ks.append(c)
                if len(msg_ids):
                    ids.append([msg_ids[i] for i in local[o:o + c].tolist()])
                    gen.append((0, 0))
                else:
                    ids.append(None)
                    gen.append((next(self._seq), request_id))
                lat.append(kp.latency_us)
                o += c
            a += kp.k
        return ks, ids, gen, lat, local

    def _write(self, batch: list) -> None:
        # The records were selected and copied on the scoring path: here they are split by
        # message, given their ids, grouped and stored.
        now = time.time()
        groups: dict[tuple, list] = {}
        for kp, rows, a in batch:
            groups.setdefault((kp.handle.name, kp.handle.version, kp.role, id(kp.ring)), []).append((kp, rows, a))
        for (model, version, role, _), members in groups.items():
            n = sum(kp.k for kp, _r, _a in members)
            try:
                in_ring, X, meta = members[0][1]
                if len(members) != in_ring:  # other versions or roles share this ring's rows
                    idx = np.concatenate([np.arange(a, a + kp.k) for kp, _r, a in members])
                    X, meta = X[idx], meta[idx]
                score, flag = meta[:, 0], (meta[:, 1].astype(np.int64) & 1) != 0
                ks, ids, gen, lat, local = self._messages(members, meta[:, 2].astype(np.int64))
                lat_rows = np.repeat(lat, ks)
                if self._process is not None:  # ids are made in the capture process, from these
                    self._process.add_captured(model, version, role, self.token, ks, ids, gen, X, score, flag, local, lat_rows,
                                               now, self.sample_rate)
                    continue  # counted when the process answers
                all_ids: list[str] = []
                o = 0
                for k, kid, (seq, request_id) in zip(ks, ids, gen):
                    if kid is not None:
                        all_ids.extend(kid)
                    else:
                        all_ids.extend([f"gen:{self.token}:{seq}:{request_id}:{i}" for i in local[o:o + k].tolist()])
                    o += k
                self._get_store().add_predictions(model, version, role, all_ids, X, score, flag, ~flag, lat_rows, now,
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


def _decode(req: Any, d: int) -> np.ndarray:
    """A ScoreRequest's records as an (n, d) float32 array (the server passes its decoded ones)."""
    if req.raw_values:
        return np.frombuffer(req.raw_values, dtype="<f4").reshape(-1, d)
    return np.asarray(req.values, dtype=np.float32).reshape(-1, d)


_NO_MARKS = np.zeros(0, dtype=np.uint8)  # _keep_rows: flag by threshold, draw the ring's own sample


def _by_head(kp: _Kept) -> int:
    return kp.h0


def _warm_up() -> None:
    """Compile (or load from the cache) _keep_rows for the arrays the server passes, before the first
    batch: a compilation on a scoring thread would stall it."""
    ring = _Ring(1, 4, np.ones(4, np.int64))
    X = np.zeros((1, 1), np.float32)
    ro = np.frombuffer(b"\0\0\0\0", dtype="<f4").reshape(1, 1)  # raw_values decode to a read-only array
    for x in (X, ro):
        for scores in (np.zeros(1, np.float64), np.zeros(1, np.float32)):
            for marks in (_NO_MARKS, np.ones(1, np.uint8)):
                _keep_rows(x, scores, 0.0, marks, ring.ctl, ring.gaps, ring.X, ring.meta)
