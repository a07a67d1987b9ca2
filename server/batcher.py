"""Micro-batching: small requests are coalesced into one kernel call; large ones pass through.

``submit`` is synchronous and binds the request to the handle serving *now*, so the requests of one
stream see versions in order, and a batch only ever mixes requests bound to the same handle. The
records admitted and not yet answered are bounded: beyond the limit, ``submit`` raises
:class:`Overloaded`. A cancelled
request is skipped when its batch forms. Kernels run on a small pool of scoring threads with the GIL
released.

NOTE: the scoring threads are plain threads fed by a ``SimpleQueue``, and a finished job comes back
to the event loop as one ``call_soon_threadsafe`` callback (no concurrent.futures Future, no wrapped
asyncio Future, no task per batch). With ``max_delay_us`` 0 (the default) the next batch is formed
and handed to a thread in that same callback. Per 256-record message this is tens of microseconds
of event-loop time less, which on a small machine is throughput (benchmarks/test_bench_server.py).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
from collections import deque
from queue import SimpleQueue
from typing import Any
from collections.abc import Callable, Sequence

import numpy as np

from .errors import Overloaded
from .memory import IdleTrim, malloc_trim
from .reload import ModelHandle
from .results import BatchOutput, CaptureTag, Explain, Pending, ScoredBatch, ScoreResult

log = logging.getLogger("outlierd.batcher")
PARALLEL_MIN_ROWS = 65536  # below this, a request runs on one scoring thread

ScoreFn = Callable[[ModelHandle, np.ndarray, "Explain | None"], BatchOutput]
"""Scores one batch on a scoring thread (the data plane's: device choice, GPU fallback, counters)."""
Observer = Callable[[ScoredBatch], None]
"""Called on the scoring thread with every scored batch; must not raise (a failure is logged)."""


def _ignore(_result: Any, _exc: BaseException | None) -> None:
    pass


class MicroBatcher:
    """Batches requests for ``score`` on ``threads`` scoring threads, and hands every scored batch
    to its observers there: ``on_scored`` before the answers go back to the event loop (drift: its
    window then holds every answered record), ``on_answered`` right after (capture and shadow
    scoring: no response waits for them). Observers only see batches of requests submitted with
    a capture tag in ``on_answered``; ``on_scored`` sees every batch."""

    def __init__(self, score: ScoreFn, *, threads: int, max_batch: int, max_delay_us: int, max_queue_records: int,
                 metrics: Any = None, on_scored: Sequence[Observer] = (), on_answered: Sequence[Observer] = (),
                 trim_after_bytes: int = 0):
        self._score = score
        self._on_scored = tuple(on_scored)
        self._on_answered = tuple(on_answered)
        self.max_batch = max_batch
        self.max_delay_s = max_delay_us / 1e6
        self.max_queue_records = max_queue_records
        self.metrics = metrics
        self._threads = threads
        self._jobs: SimpleQueue = SimpleQueue()  # (fn, args, done) for the scoring threads; None stops one
        self._workers: list[threading.Thread] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        # metric children bound once (labels() takes a lock): batch size per model name
        self._batch_hist: dict[str, Any] = {}
        self._busy = 0  # batches handed to the pool and not yet back
        self._waiting = 0  # callers of _acquire_thread waiting for a free thread
        self._free = asyncio.Event()
        self._free.set()
        self._queue: deque[Pending] = deque()
        self._queued = 0
        self._inflight = 0
        self._wake = asyncio.Event()
        self._full = asyncio.Event()
        self._task: asyncio.Task | None = None
        # after a request of trim_after_bytes, free heap goes back to the OS once nothing is in flight
        trim_fn = malloc_trim() if trim_after_bytes > 0 else None
        self._trim_fn = trim_fn
        self.trim = IdleTrim(trim_after_bytes) if trim_fn is not None else None
        self._trim_timer: asyncio.TimerHandle | None = None

    def start(self) -> None:
        self._loop = loop = asyncio.get_running_loop()
        for i in range(self._threads):
            t = threading.Thread(target=self._worker, name=f"outlierd-score_{i}", daemon=True)
            t.start()
            self._workers.append(t)
        if self.max_delay_s > 0:  # batches wait for company: a task times them
            self._task = loop.create_task(self._run(), name="outlierd-batcher")

    async def close(self) -> None:
        if self._trim_timer is not None:
            self._trim_timer.cancel()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        for _ in self._workers:
            self._jobs.put(None)
        workers, self._workers = self._workers, []
        # running kernels finish (as a ThreadPoolExecutor's shutdown(wait=True) would), off the loop
        def join_all() -> None:
            for t in workers:
                t.join()

        await asyncio.get_running_loop().run_in_executor(None, join_all)

    # -- the scoring threads ------------------------------------------------------------------

    def _worker(self) -> None:
        jobs, loop = self._jobs, self._loop
        assert loop is not None
        while True:
            job = jobs.get()
            if job is None:
                return
            running = self._execute(job, loop)
            del job  # not held while this thread waits for the next one
            if not running:
                return

    def _execute(self, job: tuple, loop: asyncio.AbstractEventLoop) -> bool:
        """Run one job on this scoring thread; False when the loop is closed.

        NOTE: a method of its own so that the job's arguments and result (a large request's records,
        its scores) are released when it returns, not held by the thread's variables until the next
        job comes, which after a burst may be never."""
        fn, args, done, tagged = job
        try:
            result, exc = fn(*args), None
        except BaseException as e:  # handed to the loop: the caller's future gets it
            result, exc = None, e
        try:
            loop.call_soon_threadsafe(done, result, exc)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            return False
        if tagged and exc is None:
            self._answered(result)
        return True

    def drain(self, timeout: float = 10.0) -> bool:
        """Wait until every job handed to the scoring threads so far is done, its capture step
        included (a flush of the capture writer after this sees every answered request). Call it
        from any thread but a scoring thread; False on timeout."""
        if not self._workers:
            return True
        barrier = threading.Barrier(len(self._workers) + 1, timeout=timeout)
        for _ in self._workers:  # each thread takes one (FIFO, after its earlier jobs) and waits for the rest
            self._jobs.put((barrier.wait, (), _ignore, None))
        try:
            barrier.wait()
        except threading.BrokenBarrierError:
            return False
        return True

    def _observe_scored(self, batch: ScoredBatch) -> None:
        for observer in self._on_scored:
            try:
                observer(batch)
            except Exception:  # an observer must never fail scoring, nor stop a scoring thread
                log.exception("observer failed model=%s version=%d", batch.handle.name, batch.handle.version)

    def _answered(self, batch: ScoredBatch) -> None:
        """The after-the-answer observers (capture, shadow scoring) of a batch with tagged requests.

        NOTE: on the scoring thread *after* the answer went to the loop, so no response waits for
        them and the event loop does nothing for capture."""
        for observer in self._on_answered:
            try:
                observer(batch)
            except Exception:  # capture must never fail scoring, nor stop a scoring thread
                log.exception("observer failed model=%s version=%d", batch.handle.name, batch.handle.version)

    def _run_job(self, fn: Callable[..., Any], *args: Any, tagged: bool = False) -> asyncio.Future:
        """``fn(*args)`` on a scoring thread; an asyncio future of its result (run_in_executor's
        contract, for the rare paths: explain, large and empty requests, a failed batch's retries).
        ``tagged``: ``fn`` returns a ScoredBatch with tagged requests, handed to the after-the-answer
        observers once the result is on its way."""
        fut = self._loop.create_future()  # type: ignore[union-attr]

        def done(result: Any, exc: BaseException | None) -> None:
            if fut.done():
                return
            if exc is not None:
                fut.set_exception(exc)
            else:
                fut.set_result(result)

        self._jobs.put((fn, args, done, tagged))
        return fut

    @property
    def queued_records(self) -> int:
        """Records waiting for a micro-batch."""
        return self._queued

    @property
    def inflight_records(self) -> int:
        """Records admitted and not yet answered (queued, waiting for a thread, or being scored)."""
        return self._inflight

    def _release(self, n: int) -> None:
        self._inflight -= n
        if self._inflight == 0 and self.trim is not None:
            self._idle()

    def _release_done(self, n: int, _fut: asyncio.Future) -> None:
        self._release(n)

    def _idle(self) -> None:
        """Nothing in flight: if a large request came since the last trim, trim the heap on a scoring
        thread once the worker has stayed idle ``trim.idle_s`` (the last answers are sent and their
        buffers freed by then): every return to idle starts the wait again."""
        assert self.trim is not None
        wait = self.trim.retry_in()
        if wait is None:
            return
        if self._trim_timer is not None:
            self._trim_timer.cancel()
        self._trim_timer = self._loop.call_later(wait, self._trim_now)  # type: ignore[union-attr]

    def _trim_now(self) -> None:
        self._trim_timer = None
        if self._inflight == 0 and self.trim is not None and self.trim.due():
            self.trim.started()
            self._jobs.put((self._trim_fn, (), _ignore, False))
            self._idle()  # the settling trim, if the worker stays idle

    def submit(self, X: np.ndarray, handle: ModelHandle, explain: Explain | None = None,
               tag: CaptureTag | None = None) -> asyncio.Future:
        """Queue ``X`` for scoring with ``handle``; the future resolves to a :class:`ScoreResult`.
        ``explain``: scored and explained in one kernel pass on a scoring thread (not
        micro-batched). ``tag``: the request's batch goes to the after-the-answer observers
        (capture, shadow scoring) once it is answered."""
        loop = asyncio.get_running_loop()
        n = X.shape[0]
        # Every admitted record counts until it is scored, pass-through ones included, so memory
        # stays bounded whatever clients do. One request larger than the limit is admitted alone.
        if self._inflight and self._inflight + n > self.max_queue_records:
            if self.metrics is not None:
                self.metrics.overloaded.inc()
            raise Overloaded(f"server overloaded: {self._inflight} records waiting or being scored "
                             f"(limit {self.max_queue_records}); retry later")
        self._inflight += n
        if self.trim is not None:
            self.trim.large(X.nbytes)
            if self._trim_timer is not None:  # busy again: the idle wait starts over when it ends
                self._trim_timer.cancel()
                self._trim_timer = None
        if n >= self.max_batch or n == 0 or explain is not None:
            return loop.create_task(self._score_direct(handle, X, explain, tag))
        fut = loop.create_future()
        fut.add_done_callback(functools.partial(self._release_done, n))
        item = Pending(X, handle, fut, tag)
        if self.max_delay_s == 0:
            if not self._queue and self._busy + self._waiting < self._threads:
                # idle thread, nothing to coalesce with: straight to a thread, no batching hop
                self._busy += 1
                items = [item]
                self._jobs.put((self._kernel, (handle, X, None, items), lambda r, e: self._batch_done(items, r, e), tag is not None))
                return fut
            # every thread busy: wait in the queue; a thread that comes back takes a batch (_pump)
            self._queue.append(item)
            self._queued += n
            self._set_depth()
            return fut
        self._queue.append(item)
        self._queued += n
        self._set_depth()
        self._wake.set()
        if self._queued >= self.max_batch:
            self._full.set()
        return fut

    def _set_depth(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(self._queued)

    async def _acquire_thread(self) -> None:
        if self._busy >= self._threads:
            # counted while waiting, so _pump leaves the next free thread to this waiter (no starvation)
            self._waiting += 1
            try:
                while self._busy >= self._threads:
                    self._free.clear()
                    await self._free.wait()
            except BaseException:
                self._waiting -= 1
                if self.max_delay_s == 0:
                    self._pump()
                raise
            self._waiting -= 1
        self._busy += 1

    def _release_thread(self) -> None:
        self._busy -= 1
        self._free.set()

    def _pump(self) -> None:
        """max_delay_us 0: while a thread is free and records wait, hand it the next batch."""
        while self._queue and self._busy + self._waiting < self._threads:
            items = self._take_batch()
            if not items:
                return
            self._busy += 1
            self._send_batch(items)

    def _send_batch(self, items: list[Pending]) -> None:
        tagged = any(it.tag is not None for it in items)
        self._jobs.put((self._score_items, (items,), lambda r, e: self._batch_done(items, r, e), tagged))

    def _score_items(self, items: list[Pending]) -> ScoredBatch:
        # on the scoring thread: the concatenation too
        X = items[0].X if len(items) == 1 else np.concatenate([it.X for it in items])
        return self._kernel(items[0].handle, X, None, items)

    def _batch_done(self, items: list[Pending], batch: ScoredBatch | None, exc: BaseException | None) -> None:
        """On the loop: a batch came back from its thread; answer its requests, then take the next."""
        if exc is not None:
            if len(items) > 1:  # one bad request must not fail its batch-mates: score them one by one
                self._jobs.put((self._score_each, (items,), lambda r, e: self._each_done(items, r, e), None))
                return  # the thread stays counted until the retries are back
            self._release_thread()
            fut = items[0].future
            if fut is not None and not fut.done():
                fut.set_exception(exc)
        else:
            assert batch is not None
            self._release_thread()
            out = batch.out
            handle = items[0].handle
            self._observe(handle, out.scores.shape[0])
            if len(items) == 1:
                fut = items[0].future
                if fut is not None and not fut.done():
                    fut.set_result(ScoreResult(handle, out.scores, out.flags, out.device))
            else:
                start = 0
                for it in items:
                    n = it.X.shape[0]
                    fut = it.future
                    if fut is not None and not fut.done():
                        fut.set_result(ScoreResult(handle, out.scores[start:start + n], out.flags[start:start + n], out.device))
                    start += n
        if self.max_delay_s == 0:
            self._pump()

    def _score_each(self, items: list[Pending]) -> list[tuple[ScoredBatch | None, BaseException | None]]:
        # a failed batch's requests one by one (rare): each captured before the answers go back
        out: list[tuple[ScoredBatch | None, BaseException | None]] = []
        for it in items:
            try:
                batch = self._kernel(it.handle, it.X, None, [it])
            except Exception as e:
                out.append((None, e))
                continue
            out.append((batch, None))
            if it.tag is not None:
                self._answered(batch)
        return out

    def _each_done(self, items: list[Pending], results: list[tuple[ScoredBatch | None, BaseException | None]] | None,
                   exc: BaseException | None) -> None:
        self._release_thread()
        for k, it in enumerate(items):
            fut = it.future
            if fut is None or fut.done():
                continue
            if exc is not None or results is None:
                fut.set_exception(exc or RuntimeError("no result"))
                continue
            batch, e = results[k]
            if e is not None or batch is None:
                fut.set_exception(e or RuntimeError("no result"))
            else:
                out = batch.out
                fut.set_result(ScoreResult(it.handle, out.scores, out.flags, out.device))
        if self.max_delay_s == 0:
            self._pump()

    async def _score_direct(self, handle: ModelHandle, X: np.ndarray, explain: Explain | None = None,
                            tag: CaptureTag | None = None) -> ScoreResult:
        n = X.shape[0]
        try:
            await self._acquire_thread()
        except asyncio.CancelledError:
            self._release(n)
            raise
        job = self._run_job(self._kernel, handle, X, explain, [Pending(X, handle, None, tag)], tagged=tag is not None)

        def done(_job: asyncio.Future) -> None:
            # the thread and the records stay counted until the thread is done, even if the caller gave up
            self._release_thread()
            self._release(n)
            if self.max_delay_s == 0:
                self._pump()

        job.add_done_callback(done)
        batch: ScoredBatch = await asyncio.shield(job)
        out = batch.out
        self._observe(handle, out.scores.shape[0])
        return ScoreResult(handle, out.scores, out.flags, out.device, out.explanation)

    def _kernel(self, handle: ModelHandle, X: np.ndarray, explain: Explain | None, items: list[Pending]) -> ScoredBatch:
        """Score one batch (the plane's scoring function) and show it to the ``on_scored``
        observers, on a scoring thread."""
        batch = ScoredBatch(handle, X, self._score(handle, X, explain), items)
        if self._on_scored:
            self._observe_scored(batch)
        return batch

    def _observe(self, handle: ModelHandle, n: int) -> None:
        if self.metrics is not None:
            h = self._batch_hist.get(handle.name)
            if h is None:
                h = self._batch_hist[handle.name] = self.metrics.batch_size.labels(handle.name)
            h.observe(n)

    def _take_batch(self) -> list[Pending]:
        """Pop queued items of one handle, up to max_batch records, skipping cancelled ones."""
        items: list[Pending] = []
        rows = 0
        while self._queue:
            item = self._queue[0]
            if item.future is None or item.future.done():  # cancelled by its caller: drop it
                self._queue.popleft()
                self._queued -= item.X.shape[0]
                continue
            if items and (item.handle is not items[0].handle or rows + item.X.shape[0] > self.max_batch):
                break
            self._queue.popleft()
            self._queued -= item.X.shape[0]
            rows += item.X.shape[0]
            items.append(item)
        self._set_depth()
        if self._queued < self.max_batch:
            self._full.clear()
        return items

    async def _run(self) -> None:
        while True:
            if not self._queue:
                self._wake.clear()
                await self._wake.wait()
                continue
            if self._queued < self.max_batch and self.max_delay_s > 0:
                try:
                    await asyncio.wait_for(self._full.wait(), timeout=self.max_delay_s)
                except TimeoutError:
                    pass
            await self._acquire_thread()
            items = self._take_batch()
            if not items:
                self._release_thread()
                continue
            self._send_batch(items)  # the thread is released when the batch is back (_batch_done)
