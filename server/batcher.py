"""Micro-batching: small requests are coalesced into one kernel call; large ones pass through.

``submit`` is synchronous and binds the request to the handle serving *now*, so the requests of one
stream see versions in order, and a batch only ever mixes requests bound to the same handle. The
records admitted and not yet answered are bounded: beyond the limit, ``submit`` raises
:class:`Overloaded`. A cancelled
request is skipped when its batch forms. Kernels run on a small thread pool with the GIL released.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import Overloaded
from .reload import ModelHandle, ModelSlot

log = logging.getLogger("outlierd.batcher")
PARALLEL_MIN_ROWS = 65536  # below this, a request runs on one scoring thread


@dataclass
class _Item:
    X: np.ndarray
    handle: ModelHandle
    future: asyncio.Future = field(repr=False)


class MicroBatcher:
    def __init__(self, slot: ModelSlot, *, threads: int, max_batch: int, max_delay_us: int, max_queue_records: int, metrics: Any = None):
        self.slot = slot
        self.max_batch = max_batch
        self.max_delay_s = max_delay_us / 1e6
        self.max_queue_records = max_queue_records
        self.metrics = metrics
        self.executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="outlierd-score")
        self._threads = threads
        self._busy = 0  # batches handed to the pool and not yet back
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

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="outlierd-batcher")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self.executor.shutdown(wait=True)

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

    def submit(self, X: np.ndarray, handle: ModelHandle | None = None, explain: tuple[int, bool] | None = None) -> asyncio.Future:
        """Queue ``X`` for scoring with ``handle`` (default: the one serving now); the future
        resolves to ``(handle, scores, device)``. ``explain=(top_k, flagged_only)``: scored and
        explained in one kernel pass on a scoring thread (not micro-batched), resolving to
        ``(handle, scores, device, (features, contributions))``."""
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
            return loop.create_task(self._score_direct(handle, X, explain))
        fut = loop.create_future()
        fut.add_done_callback(lambda _f, n=n: self._release(n))
        if not self._queue and self._busy < self._threads and self.max_delay_s == 0:
            # idle thread, nothing to coalesce with: straight to the pool, no batching hop
            self._busy += 1
            job = loop.run_in_executor(self.executor, self._kernel, handle, X)
            job.add_done_callback(lambda j: self._finish(j, fut, handle))
            return fut
        self._queue.append(_Item(X, handle, fut))
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
        while self._busy >= self._threads:
            self._free.clear()
            await self._free.wait()
        self._busy += 1

    def _release_thread(self) -> None:
        self._busy -= 1
        self._free.set()

    def _finish(self, job: asyncio.Future, fut: asyncio.Future, handle: ModelHandle) -> None:
        self._release_thread()
        if fut.done():
            return
        if job.cancelled():
            fut.cancel()
        elif job.exception() is not None:
            fut.set_exception(job.exception())
        else:
            scores, device = job.result()
            self._observe(handle, scores.shape[0])
            fut.set_result((handle, scores, device))

    async def _score_direct(self, handle: ModelHandle, X: np.ndarray, explain: tuple[int, bool] | None = None) -> tuple:
        n = X.shape[0]
        try:
            await self._acquire_thread()
        except asyncio.CancelledError:
            self._release(n)
            raise
        job = asyncio.get_running_loop().run_in_executor(self.executor, self._kernel, handle, X, explain)

        def done(_job: asyncio.Future) -> None:
            # the thread and the records stay counted until the thread is done, even if the caller gave up
            self._release_thread()
            self._release(n)

        job.add_done_callback(done)
        scores, device, *explanation = await asyncio.shield(job)
        self._observe(handle, scores.shape[0])
        return (handle, scores, device, *explanation)

    def _kernel(self, handle: ModelHandle, X: np.ndarray, explain: tuple[int, bool] | None = None) -> tuple:
        """Score one batch where the device policy says; returns (scores, device it ran on), and
        with ``explain=(top_k, flagged_only)`` also (features, contributions), computed on the CPU
        kernels (the GPU backends' attributions are the CPU kernel's anyway)."""
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
        return (scores, device) if explanation is None else (scores, device, tuple(explanation))

    def kernel_us(self, handle: ModelHandle) -> float:
        """Kernel time per record (microseconds) of the latest batch scored with ``handle``'s
        version; NaN before the first one."""
        return self._kernel_us.get((handle.name, handle.version), float("nan"))

    def _observe(self, handle: ModelHandle, n: int) -> None:
        if self.metrics is not None:
            self.metrics.batch_size.labels(handle.name).observe(n)

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
            asyncio.get_running_loop().create_task(self._score_batch(items))

    async def _score_batch(self, items: list[_Item]) -> None:
        try:
            handle = items[0].handle
            X = items[0].X if len(items) == 1 else np.concatenate([it.X for it in items])
            loop = asyncio.get_running_loop()
            try:
                scores, device = await loop.run_in_executor(self.executor, self._kernel, handle, X)
            except Exception:
                # one bad request must not fail its batch-mates: score them one by one
                for it in items:
                    await self._score_alone(it)
                return
            self._observe(handle, X.shape[0])
            start = 0
            for it in items:
                n = it.X.shape[0]
                if not it.future.done():
                    it.future.set_result((handle, scores[start:start + n], device))
                start += n
        finally:
            self._release_thread()

    async def _score_alone(self, it: _Item) -> None:
        try:
            scores, device = await asyncio.get_running_loop().run_in_executor(self.executor, self._kernel, it.handle, it.X)
        except Exception as e:
            if not it.future.done():
                it.future.set_exception(e)
            return
        if not it.future.done():
            it.future.set_result((it.handle, scores, device))
