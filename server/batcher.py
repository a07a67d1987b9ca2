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
import logging
import threading
import time
from collections import deque
from queue import SimpleQueue
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np

from .errors import Overloaded
from .reload import ModelHandle, ModelSlot

log = logging.getLogger("outlierd.batcher")
PARALLEL_MIN_ROWS = 65536  # below this, a request runs on one scoring thread


class CaptureTag(NamedTuple):
    """What capture needs of a request beyond its records and scores: the message's ``ids`` (one
    per record, or empty: generated), its ``request_id``, and ``then``, called on the scoring thread
    with the request's capture selection (or None) once capture is done (shadow scoring: the
    challenger samples the records the champion's sample picked)."""

    ids: Sequence[str]
    request_id: int
    then: Callable[[Any], None] | None = None


_UNTAGGED = CaptureTag((), 0)


@dataclass
class _Item:
    X: np.ndarray
    handle: ModelHandle
    future: asyncio.Future | None = field(repr=False)
    tag: CaptureTag | None = None


def _ignore(_result: Any, _exc: BaseException | None) -> None:
    pass


class MicroBatcher:
    def __init__(self, slot: ModelSlot, *, threads: int, max_batch: int, max_delay_us: int, max_queue_records: int, metrics: Any = None):
        self.slot = slot
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
        self._queue: deque[_Item] = deque()
        self._queued = 0
        self._inflight = 0
        self._wake = asyncio.Event()
        self._full = asyncio.Event()
        self._task: asyncio.Task | None = None
        # kernel time per record of the latest batch, per (model, version): captured with the records
        # (rollout compares champion and challenger latency); written by scoring threads, a plain dict store
        self._kernel_us: dict[tuple[str, int], float] = {}
        # monitoring.capture.CaptureWriter, set by the worker: requests submitted with a CaptureTag
        # are captured on the scoring thread once their answer is on its way (see _worker)
        self.capture: Any = None

    def start(self) -> None:
        self._loop = loop = asyncio.get_running_loop()
        for i in range(self._threads):
            t = threading.Thread(target=self._worker, name=f"outlierd-score_{i}", daemon=True)
            t.start()
            self._workers.append(t)
        if self.max_delay_s > 0:  # batches wait for company: a task times them
            self._task = loop.create_task(self._run(), name="outlierd-batcher")

    async def close(self) -> None:
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
        await asyncio.get_running_loop().run_in_executor(None, lambda: [t.join() for t in workers])

    # -- the scoring threads ------------------------------------------------------------------

    def _worker(self) -> None:
        jobs, loop = self._jobs, self._loop
        assert loop is not None
        while True:
            job = jobs.get()
            if job is None:
                return
            fn, args, done, items = job
            try:
                result, exc = fn(*args), None
            except BaseException as e:  # handed to the loop: the caller's future gets it
                result, exc = None, e
            try:
                loop.call_soon_threadsafe(done, result, exc)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                return
            if items is not None and exc is None:
                self._capture(items, result[0], result[2])

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

    def _capture(self, items: list[_Item], scores: np.ndarray, X: np.ndarray) -> None:
        """Capture a scored batch's flagged records and sample (one Numba call into the writer's
        ring and one append to its queue: CaptureWriter.capture_batch), then call the tags' hooks.

        NOTE: on the scoring thread *after* the answer went to the loop, so no response waits for
        it and the event loop does nothing for capture (it used to select before the answer and
        attach on the loop: a step on every message's path)."""
        # NOTE: every Python step here costs several times its quiet-process cost (the kernel just
        # ran on this thread): the usual case, one tagged request and no hook, takes few
        one = items[0].tag if len(items) == 1 else None
        if one is None and all(it.tag is None for it in items):
            return
        try:
            handle = items[0].handle
            sel = None
            cap = self.capture
            if cap is not None and scores.shape[0]:
                role = "challenger" if handle.alias == "challenger" else "champion"
                kernel_us = self._kernel_us.get((handle.name, handle.version), float("nan"))
                if one is not None:
                    sel = cap.capture_batch(handle, role, X, scores, handle.threshold, (one,), None, kernel_us)
                else:  # untagged requests (none from the servicer) get generated ids
                    sel = cap.capture_batch(handle, role, X, scores, handle.threshold, [it.tag or _UNTAGGED for it in items],
                                            [it.X.shape[0] for it in items], kernel_us)
            if one is not None:
                if one.then is not None:
                    one.then(sel)
                return
            start = 0
            for it in items:
                if it.tag is not None and it.tag.then is not None:
                    it.tag.then(None if sel is None else sel._replace(start=start))
                start += it.X.shape[0]
        except Exception:  # capture must never fail scoring, nor stop a scoring thread
            log.exception("capture failed model=%s version=%d", items[0].handle.name, items[0].handle.version)

    def _run_job(self, fn, *args, items: list[_Item] | None = None) -> asyncio.Future:
        """``fn(*args)`` on a scoring thread; an asyncio future of its result (run_in_executor's
        contract, for the rare paths: explain, large and empty requests, a failed batch's retries).
        ``items``: captured once the result is handed over (``fn`` returns ``(scores, device, X, ...)``)."""
        fut = self._loop.create_future()  # type: ignore[union-attr]

        def done(result: Any, exc: BaseException | None) -> None:
            if fut.done():
                return
            if exc is not None:
                fut.set_exception(exc)
            else:
                fut.set_result(result)

        self._jobs.put((fn, args, done, items))
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

    def submit(self, X: np.ndarray, handle: ModelHandle | None = None, explain: tuple[int, bool] | None = None,
               tag: CaptureTag | None = None) -> asyncio.Future:
        """Queue ``X`` for scoring with ``handle`` (default: the one serving now); the future
        resolves to ``(handle, scores, device)``.
        ``explain=(top_k, flagged_only)``: scored and explained in one kernel pass on a scoring
        thread (not micro-batched), resolving to ``(handle, scores, device, (features,
        contributions))``. ``tag``: capture the request (with the writer set as ``capture``) after
        it is answered, and call ``tag.then``."""
        handle = handle or self.slot.current
        assert handle is not None, "no model loaded"
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
        if n >= self.max_batch or n == 0 or explain is not None:
            return loop.create_task(self._score_direct(handle, X, explain, tag))
        fut = loop.create_future()
        fut.add_done_callback(lambda _f, n=n: self._release(n))
        item = _Item(X, handle, fut, tag)
        if self.max_delay_s == 0:
            if not self._queue and self._busy + self._waiting < self._threads:
                # idle thread, nothing to coalesce with: straight to a thread, no batching hop
                self._busy += 1
                self._jobs.put((self._kernel, (handle, X), lambda r, e: self._batch_done([item], r, e), None if tag is None else [item]))
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

    def _send_batch(self, items: list[_Item]) -> None:
        self._jobs.put((self._score_items, (items,), lambda r, e: self._batch_done(items, r, e), items))

    def _score_items(self, items: list[_Item]) -> tuple:
        # on the scoring thread: the concatenation too
        X = items[0].X if len(items) == 1 else np.concatenate([it.X for it in items])
        return self._kernel(items[0].handle, X)

    def _batch_done(self, items: list[_Item], result: tuple | None, exc: BaseException | None) -> None:
        """On the loop: a batch came back from its thread; answer its requests, then take the next."""
        if exc is not None:
            if len(items) > 1:  # one bad request must not fail its batch-mates: score them one by one
                self._jobs.put((self._score_each, (items,), lambda r, e: self._each_done(items, r, e), None))
                return  # the thread stays counted until the retries are back
            self._release_thread()
            fut = items[0].future
            if not fut.done():
                fut.set_exception(exc)
        else:
            self._release_thread()
            scores, device = result[0], result[1]  # type: ignore[index]
            handle = items[0].handle
            self._observe(handle, scores.shape[0])
            if len(items) == 1:
                fut = items[0].future
                if not fut.done():
                    fut.set_result((handle, scores, device))
            else:
                start = 0
                for it in items:
                    n = it.X.shape[0]
                    if not it.future.done():
                        it.future.set_result((handle, scores[start:start + n], device))
                    start += n
        if self.max_delay_s == 0:
            self._pump()

    def _score_each(self, items: list[_Item]) -> list[tuple]:
        # a failed batch's requests one by one (rare): each captured before the answers go back
        out: list[tuple] = []
        for it in items:
            try:
                result = self._kernel(it.handle, it.X)
            except Exception as e:
                out.append((None, e))
                continue
            out.append((result, None))
            if it.tag is not None:
                self._capture([it], result[0], result[2])
        return out

    def _each_done(self, items: list[_Item], results: list[tuple] | None, exc: BaseException | None) -> None:
        self._release_thread()
        for k, it in enumerate(items):
            if it.future.done():
                continue
            if exc is not None:
                it.future.set_exception(exc)
                continue
            result, e = results[k]  # type: ignore[index]
            if e is not None:
                it.future.set_exception(e)
            else:
                it.future.set_result((it.handle, result[0], result[1]))
        if self.max_delay_s == 0:
            self._pump()

    async def _score_direct(self, handle: ModelHandle, X: np.ndarray, explain: tuple[int, bool] | None = None,
                            tag: CaptureTag | None = None) -> tuple:
        n = X.shape[0]
        try:
            await self._acquire_thread()
        except asyncio.CancelledError:
            self._release(n)
            raise
        job = self._run_job(self._kernel, handle, X, explain, items=None if tag is None else [_Item(X, handle, None, tag)])

        def done(_job: asyncio.Future) -> None:
            # the thread and the records stay counted until the thread is done, even if the caller gave up
            self._release_thread()
            self._release(n)
            if self.max_delay_s == 0:
                self._pump()

        job.add_done_callback(done)
        scores, device, _X, explanation = await asyncio.shield(job)
        self._observe(handle, scores.shape[0])
        return (handle, scores, device) if explanation is None else (handle, scores, device, explanation)

    def _kernel(self, handle: ModelHandle, X: np.ndarray, explain: tuple[int, bool] | None = None) -> tuple:
        """Score one batch where the device policy says; returns ``(scores, device it ran on, X,
        explanation)``: with ``explain=(top_k, flagged_only)`` the explanation is (features,
        contributions), computed on the CPU kernels (the GPU backends' attributions are the CPU
        kernel's anyway); otherwise None."""
        explanation = None
        scores = None
        device = "cpu"
        t0 = time.perf_counter()
        if explain is not None:  # flagged_only cuts at the threshold in force, as `anomalous` does
            scores, *explanation = handle.model.score_explain(X, explain[0], explain[1], threshold=handle.threshold,
                                                              parallel=X.shape[0] > PARALLEL_MIN_ROWS)
            device = handle.model.device
        elif handle.gpu_model is not None and X.shape[0] >= handle.gpu_min_rows:
            try:
                scores, device = handle.gpu_model.score(X), "cuda"
            except Exception as e:  # a GPU failure falls back to the CPU kernel: counted and logged
                log.error("cuda scoring failed, falling back to cpu model=%s version=%d error=%s", handle.name, handle.version, e)
                if self.metrics is not None:
                    self.metrics.device_fallbacks.labels(handle.name).inc()
        if scores is None:
            # The pool's threads already use the cores: one core per batch, unless a batch is huge.
            scores = handle.model.score(X, parallel=X.shape[0] > PARALLEL_MIN_ROWS)
            device = handle.model.device
        if X.shape[0]:
            self._kernel_us[(handle.name, handle.version)] = (time.perf_counter() - t0) * 1e6 / X.shape[0]
        if handle.monitor is not None:
            try:  # drift and data quality, per batch, still on the scoring thread (GIL released)
                handle.monitor.observe(X, scores, handle.threshold)
            except Exception:  # monitoring must never fail scoring
                log.exception("drift monitor failed model=%s version=%d", handle.name, handle.version)
        return scores, device, X, None if explanation is None else tuple(explanation)

    def _observe(self, handle: ModelHandle, n: int) -> None:
        if self.metrics is not None:
            h = self._batch_hist.get(handle.name)
            if h is None:
                h = self._batch_hist[handle.name] = self.metrics.batch_size.labels(handle.name)
            h.observe(n)

    def _take_batch(self) -> list[_Item]:
        """Pop queued items of one handle, up to max_batch records, skipping cancelled ones."""
        items: list[_Item] = []
        rows = 0
        while self._queue:
            item = self._queue[0]
            if item.future.done():  # cancelled by its caller: drop it
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
                except asyncio.TimeoutError:
                    pass
            await self._acquire_thread()
            items = self._take_batch()
            if not items:
                self._release_thread()
                continue
            self._send_batch(items)  # the thread is released when the batch is back (_batch_done)
