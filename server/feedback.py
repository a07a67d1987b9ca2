"""Feedback RPCs (SubmitFeedback, SubmitFeedbackStream) and the worker's feedback service.

A label is acknowledged (``stored = true``) only after its transaction committed with
``synchronous=FULL`` (fsynced). SQLite never runs on the event loop: writes go to one writer thread
per worker. Labels are committed in groups: a stream's consecutive labels, and every call waiting
while the previous commit ran, share one transaction (one fsync); each is acked after that commit,
a stream's in request order. Unknown record ids (no captured prediction) are stored and
acked with ``known_record = false``. Invalid input: unary calls fail with INVALID_ARGUMENT or
NOT_FOUND naming the problem; on a stream that message gets an ack with ``stored = false`` and
``error`` set, and the stream goes on.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from collections.abc import AsyncIterator, Sequence

import grpc

from outlierd.core.labels import ANOMALY, NORMAL
from outlierd.monitoring.quality import from_store
from outlierd.monitoring.store import LabelRow, StoreOpener
from outlierd.v1 import scoring_pb2 as pb

from .errors import RequestError, message_error, stream_errors, unary_errors
from .plane import utf8_size
from .requests import refuse_undecodable
from .streams import StreamGuard

log = logging.getLogger("outlierd.feedback")
STREAM_GROUP = 512  # labels of one stream committed in one transaction at most
CAPTURE_SETTLE_S = 1.0  # how long a label with an unknown record id waits for captures in flight
_LABELS = {pb.ANOMALY: ANOMALY, pb.NORMAL: NORMAL}


@dataclass(frozen=True)
class FieldLimits:
    """Longest feedback fields accepted, in UTF-8 bytes (``--max-id-bytes``, ``--max-reviewer-bytes``,
    ``--max-note-bytes``): labels are stored for good, so a client cannot make them arbitrarily large."""

    record_id: int = 256
    reviewer: int = 256
    note: int = 4096

    @classmethod
    def from_settings(cls, settings: Any) -> FieldLimits:
        return cls(settings.max_id_bytes, settings.max_reviewer_bytes, settings.max_note_bytes)

    def check(self, name: str, text: str) -> None:
        limit = getattr(self, name)
        size = utf8_size(text, limit)
        if size > limit:
            flag = "--max-id-bytes" if name == "record_id" else f"--max-{name}-bytes"
            raise RequestError(f"{name} is {size} bytes; the limit is {limit} bytes ({flag} on the server)", reason="feedback")


class FeedbackService:
    """A worker's feedback side: the store (opened lazily), one writer thread for labels, and the
    quality gauges recomputed at most every ``quality_interval_s`` on their own thread."""

    def __init__(self, opener: StoreOpener, model: str, metrics: Any = None, quality_interval_s: float = 5.0,
                 capture: Any = None, limits: FieldLimits = FieldLimits()):
        self.opener, self.model, self.metrics = opener, model, metrics
        self.capture = capture  # monitoring.capture.CaptureWriter: records scored a moment ago are still on their way
        self.limits = limits
        self.quality_interval_s = quality_interval_s
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="outlierd-feedback")
        self._quality_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="outlierd-quality")
        self._quality_job: Future | None = None
        self._quality_at = -math.inf
        self._quality_failed_logged = -math.inf
        # calls waiting for the next commit: their rows, their future, each row's model ("": this service's)
        self._pending: list[tuple[Sequence[LabelRow], asyncio.Future, Sequence[str]]] = []
        self._committing = False

    def _add(self, rows: Sequence[LabelRow], models: Sequence[str] = ()) -> list[bool]:
        """Store ``rows`` (each under its model in ``models``; none given: this service's model)."""
        names = set(models)
        if len(names) > 1:  # several models served (--models): each model's labels under its own name
            known = [False] * len(rows)
            for name in names:
                at = [i for i, m in enumerate(models) if m == name]
                for i, k in zip(at, self._add([rows[i] for i in at], (name,) * len(at))):
                    known[i] = k
            return known
        model = next(iter(names)) if names else self.model
        store = self.opener.get()
        known = store.add_labels(model, rows)
        if self.capture is not None and not all(known) and self.capture.flush(CAPTURE_SETTLE_S):
            # NOTE: capture writes every ~100 ms, so a record scored just before its label arrives
            # is usually still on its way to the store: flush, then look again (only for the
            # unknown ids: labels for records scored long ago pay nothing)
            again = iter(store.known(model, [r.record_id for r, k in zip(rows, known) if not k]))
            known = [k or next(again) for k in known]
        return known

    async def store(self, rows: Sequence[LabelRow], models: Sequence[str] = ()) -> list[bool]:
        """Store ``rows`` durably (off the event loop); known_record per row. Calls that arrive while
        a commit is running are committed together in the next transaction (group commit: one fsync
        for all of them), each answered only after it. A store that cannot be written raises
        RequestError(UNAVAILABLE); nothing of that transaction is stored. ``models``: each row's
        model when the server serves several ("" or none given: this service's model)."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._pending.append((rows, fut, [m or self.model for m in models] if models else [self.model] * len(rows)))
        if not self._committing:
            self._committing = True
            loop.create_task(self._commit_pending())
        return await fut

    async def _commit_pending(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                rows = [r for part, _, _ in batch for r in part]
                models = [m for _, _, ms in batch for m in ms]
                try:
                    known = await loop.run_in_executor(self._writer, self._add, rows, models)
                except Exception as e:  # sqlite3.Error, OSError (or ValueError from the store's own checks)
                    log.error("feedback write failed labels=%d error=%s", len(rows), e)
                    err = (RequestError(str(e), reason="feedback") if isinstance(e, ValueError) else
                           RequestError(f"feedback store unavailable, labels not stored: {e}", code="UNAVAILABLE", reason="feedback"))
                    for _, fut, _ in batch:
                        if not fut.done():  # a caller that went away (cancelled) needs no answer
                            fut.set_exception(err)
                    continue
                start = 0
                for part, fut, _ in batch:
                    if not fut.done():
                        fut.set_result(known[start:start + len(part)])
                    start += len(part)
        finally:
            self._committing = False

    def tick(self) -> None:
        """From the worker's background tick: start a quality recomputation when due (never waits)."""
        if self.metrics is None:
            return
        now = time.monotonic()
        if now - self._quality_at < self.quality_interval_s or (self._quality_job is not None and not self._quality_job.done()):
            return
        self._quality_at = now
        self._quality_job = self._quality_pool.submit(self._update_quality)

    def _update_quality(self) -> None:
        try:
            q = from_store(self.opener.get(), self.model)
            self.metrics.feedback.set(self.model, q)
        except Exception as e:  # gauges go stale; serving goes on
            now = time.monotonic()
            if now - self._quality_failed_logged > 60:
                self._quality_failed_logged = now
                log.warning("feedback quality not computed model=%s error=%s", self.model, e)

    def close(self) -> None:
        self._writer.shutdown(wait=True)
        self._quality_pool.shutdown(wait=False, cancel_futures=True)


def label_row(req: pb.FeedbackRequest, limits: FieldLimits = FieldLimits()) -> LabelRow:
    """The store row for a request, or RequestError naming what is wrong (the model name is the
    caller's to check)."""
    if not req.record_id:
        raise RequestError("record_id is empty: send the id the record was scored with", reason="feedback")
    limits.check("record_id", req.record_id)
    limits.check("reviewer", req.reviewer)
    limits.check("note", req.note)
    label = _LABELS.get(req.label)
    if label is None:
        raise RequestError(f"label is {pb.Label.Name(req.label) if req.label in pb.Label.values() else req.label}: "
                           "set ANOMALY or NORMAL", reason="feedback")
    return LabelRow(req.record_id, label, req.reviewer, req.note)


class FeedbackRpcs:
    """Mixin for ScorerServicer: the two feedback RPCs. The servicer provides ``feedback`` (None:
    feedback off) and ``plane`` (which models this server serves)."""

    feedback: FeedbackService | None
    plane: Any
    streams: StreamGuard

    def _feedback_service(self) -> FeedbackService:
        if self.feedback is None:
            raise RequestError("feedback is not enabled on this server", code="UNAVAILABLE", reason="feedback")
        return self.feedback

    def _label_row(self, req: pb.FeedbackRequest, where: str = "the request") -> LabelRow:
        refuse_undecodable(req, where)
        self.plane.resolve(req.model)  # NOT_FOUND for a model this server does not serve
        return label_row(req, self.feedback.limits if self.feedback is not None else FieldLimits())

    @unary_errors("storing feedback")
    async def SubmitFeedback(self, request: pb.FeedbackRequest, context: grpc.aio.ServicerContext) -> pb.FeedbackAck:  # noqa: N802 - gRPC name
        service = self._feedback_service()
        row = self._label_row(request)
        known = (await service.store([row], [request.model]))[0]
        return pb.FeedbackAck(record_id=request.record_id, stored=True, known_record=known)

    @stream_errors("storing feedback")
    async def SubmitFeedbackStream(self, request_iterator: AsyncIterator[pb.FeedbackRequest],  # noqa: N802 - gRPC name
                                   context: grpc.aio.ServicerContext) -> AsyncIterator[pb.FeedbackAck]:
        # A reader task takes messages as they come; each round commits every valid label waiting
        # (up to STREAM_GROUP) in one transaction, then acks them all in order. Labels arriving
        # during a commit form the next group: the busier the stream, the larger the groups.
        pending: asyncio.Queue = asyncio.Queue(maxsize=STREAM_GROUP)
        committing = [False]
        timer: Any = None

        async def reader() -> None:
            try:
                async for req in request_iterator:
                    if timer is not None:
                        timer.touch()
                    await pending.put(req)
            finally:
                await pending.put(None)

        with self.streams.admit(context):
            task = asyncio.get_running_loop().create_task(reader())
            timer = self.streams.timer(task.cancel, busy=lambda: not pending.empty() or committing[0])
            try:
                async for ack in self._feedback_stream(pending, timer, committing):
                    yield ack
                if timer is not None and timer.fired:
                    raise timer.closed_error()
            finally:
                if timer is not None:
                    timer.cancel()
                task.cancel()

    async def _feedback_stream(self, pending: asyncio.Queue, timer: Any, committing: list[bool]) -> AsyncIterator[pb.FeedbackAck]:
        limits = self.feedback.limits if self.feedback is not None else FieldLimits()
        position = 0  # messages taken so far (an undecodable one is named by its position)
        done = False
        while not done:
            first = await pending.get()
            if first is None:
                break
            group = [first]
            while len(group) < STREAM_GROUP and not pending.empty():
                nxt = pending.get_nowait()
                if nxt is None:
                    done = True
                    break
                group.append(nxt)
            acks: list[pb.FeedbackAck] = []
            rows: list[LabelRow] = []
            models: list[str] = []
            slots: list[int] = []
            for req in group:
                position += 1
                record_id = getattr(req, "record_id", "")  # "" for a message that did not decode
                try:
                    rows.append(self._label_row(req, f"message {position} of the stream"))
                    models.append(req.model)
                    slots.append(len(acks))
                    acks.append(pb.FeedbackAck(record_id=record_id))
                except RequestError as e:  # a record id over the limit is not echoed back
                    echo = record_id if len(record_id) <= limits.record_id else ""
                    acks.append(pb.FeedbackAck(record_id=echo, stored=False, error=message_error(e)))
            if rows:
                committing[0] = True  # a slow commit is not idleness
                try:
                    known = await self._feedback_service().store(rows, models)
                except RequestError as e:
                    for i in slots:
                        acks[i].error = message_error(e)
                else:
                    for i, k in zip(slots, known):
                        acks[i].stored, acks[i].known_record = True, k
                finally:
                    committing[0] = False
            if timer is not None:
                timer.touch()
            for ack in acks:
                yield ack
