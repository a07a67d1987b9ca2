"""Kafka in, scores / alerts / dead letters out (confluent-kafka, the ``kafka`` extra).

One loop per process, batch after batch: poll up to ``max_inflight`` records, score them through
:class:`ConsumeCore`, publish, then commit the offsets. Nothing is committed before its outputs are
delivered, so a crash, a SIGKILL or a rebalance re-delivers at most the batch in flight:

* ``at-least-once`` (default): outputs are flushed and every delivery confirmed, then the batch's
  offsets are committed synchronously. A re-delivered batch gives its results again (same key, same
  id: consumers dedupe by id).
* ``exactly-once``: one transaction per batch holding the outputs and the offsets
  (``send_offsets_to_transaction`` with the consumer's group metadata, so a zombie is fenced); a
  ``read_committed`` reader sees each result once. A failed transaction is aborted and the consumer
  rewinds to the batch's first offsets.

Back-pressure: the loop holds at most one batch (``max_inflight`` records) between poll and commit,
and librdkafka's prefetch queue is capped (``queued.max.messages.kbytes``), so memory is bounded
whatever the producer's rate. Rebalance: the revocation callback runs inside ``consume()``, when the
previous batch is already published and committed: there is never a batch to finish at that point.
A consumer group with cooperative-sticky assignment scales out by adding replicas (up to the number
of partitions).
"""

from __future__ import annotations

import asyncio
import logging
import time
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from outlierd.core.errors import InvalidInputError

from .consume import BatchResult, ConsumeCore, Message, Output

log = logging.getLogger("outlierd.consume.kafka")
GUARANTEES = ("at-least-once", "exactly-once")


def require_kafka() -> Any:
    try:
        import confluent_kafka
    except ImportError as e:
        raise InvalidInputError("kafka:// needs the kafka extra: pip install 'outlierd[kafka]' (confluent-kafka)") from e
    return confluent_kafka


def parse_url(url: str, scheme: str = "kafka") -> tuple[str, str]:
    """``kafka://HOST:PORT[,HOST:PORT]/TOPIC`` -> (bootstrap servers, topic); InvalidInputError else."""
    parts = urlsplit(url)
    topic = parts.path.lstrip("/")
    if parts.scheme != scheme or not parts.netloc or not topic:
        raise InvalidInputError(f"expected {scheme}://HOST:PORT/TOPIC; got {url!r}")
    return parts.netloc, topic


@dataclass
class KafkaOptions:
    source: str
    group: str
    out: str
    alerts: str | None = None
    dlq: str | None = None
    guarantee: str = "at-least-once"
    max_inflight: int = 2000
    poll_timeout_s: float = 0.2
    max_poll_interval_ms: int = 10000  # a lone consumer's partitions move within ~10 s of a hang
    session_timeout_ms: int = 6000
    prefetch_kbytes: int = 4096  # librdkafka's prefetch queue per partition: bounds memory under a flood
    instance: str = ""  # exactly-once: the transactional id's suffix, stable across restarts (default: the host name)

    def __post_init__(self) -> None:
        if self.guarantee not in GUARANTEES:
            raise InvalidInputError(f"--guarantee must be one of {', '.join(GUARANTEES)}; got {self.guarantee!r}")
        if self.max_inflight < 1:
            raise InvalidInputError(f"--max-inflight must be at least 1; got {self.max_inflight}")


class DeliveryFailed(RuntimeError):
    pass


class KafkaConsumerLoop:
    """The consume -> score -> publish -> commit loop; ``run(stop)`` until ``stop`` is set."""

    def __init__(self, core: ConsumeCore, opts: KafkaOptions, metrics: Any = None) -> None:
        ck = require_kafka()
        self.ck, self.core, self.opts, self.metrics = ck, core, opts, metrics
        self.bootstrap, self.topic = parse_url(opts.source)
        self.out_topic = self._topic(opts.out)
        self.alert_topic = self._topic(opts.alerts) if opts.alerts else None
        self.dlq_topic = self._topic(opts.dlq) if opts.dlq else None
        self.eos = opts.guarantee == "exactly-once"
        self.consumer = ck.Consumer({
            "bootstrap.servers": self.bootstrap, "group.id": opts.group, "enable.auto.commit": False,
            "auto.offset.reset": "earliest", "partition.assignment.strategy": "cooperative-sticky",
            "max.poll.interval.ms": opts.max_poll_interval_ms, "session.timeout.ms": opts.session_timeout_ms,
            "queued.max.messages.kbytes": opts.prefetch_kbytes, "isolation.level": "read_committed",
        })
        pconf: dict[str, Any] = {"bootstrap.servers": self.bootstrap, "enable.idempotence": True, "linger.ms": 5,
                                 "compression.type": "none"}
        if self.eos:
            # NOTE: stable across a restart, so the restarted instance fences its dead self's open transaction
            pconf["transactional.id"] = f"outlierd-{opts.group}-{opts.instance or socket.gethostname()}"
        self.producer = ck.Producer(pconf)
        self.failures: list[str] = []
        self.batches = 0
        self._last_lag = 0.0

    def _topic(self, url: str) -> str:
        bootstrap, topic = parse_url(url)
        if bootstrap != self.bootstrap:
            raise InvalidInputError(f"{url}: outputs go to the source's cluster ({self.bootstrap}) so a batch commits as one")
        return topic

    def _delivered(self, err: Any, msg: Any) -> None:
        if err is not None:
            self.failures.append(str(err))

    def _produce(self, topic: str, out: Output) -> None:
        while True:
            try:
                self.producer.produce(topic, out.value, key=out.key, headers=out.headers or None, on_delivery=self._delivered)
                return
            except BufferError:  # the producer's queue is full: serve deliveries, then retry
                self.producer.poll(0.05)

    def publish(self, res: BatchResult) -> None:
        for o in res.results:
            self._produce(self.out_topic, o)
        if self.alert_topic is not None:
            for o in res.alerts:
                self._produce(self.alert_topic, o)
        if self.dlq_topic is not None:
            for o in res.dead:
                self._produce(self.dlq_topic, o)
        elif res.dead:
            log.warning("dropped %d malformed messages (no --dlq): first error %s", len(res.dead), res.dead[0].headers[0][1])
        self.producer.poll(0)

    @staticmethod
    def next_offsets(msgs: list[Any], ck: Any) -> tuple[list[Any], list[Any]]:
        """(offsets to commit: last + 1 per partition, first offsets of the batch: where to rewind)."""
        last: dict[tuple[str, int], int] = {}
        first: dict[tuple[str, int], int] = {}
        for m in msgs:
            tp = (m.topic(), m.partition())
            last[tp] = m.offset()
            first.setdefault(tp, m.offset())
        return ([ck.TopicPartition(t, p, o + 1) for (t, p), o in last.items()],
                [ck.TopicPartition(t, p, o) for (t, p), o in first.items()])

    async def run(self, stop: asyncio.Event, on_ready: Callable[[], None] | None = None) -> None:
        loop = asyncio.get_running_loop()
        run = loop.run_in_executor
        if self.eos:
            await run(None, self.producer.init_transactions, 30)
        self.consumer.subscribe([self.topic], on_assign=self._assigned, on_revoke=self._revoked)
        if on_ready is not None:
            on_ready()
        try:
            while not stop.is_set():
                raw = await run(None, self.consumer.consume, self.opts.max_inflight, self.opts.poll_timeout_s)
                msgs = []
                for m in raw:
                    if m.error() is None:
                        msgs.append(m)
                    elif m.error().code() != self.ck.KafkaError._PARTITION_EOF:
                        log.warning("consumer error: %s", m.error())
                if msgs:
                    await self._batch(msgs, run)
                self._lag()
        finally:
            await run(None, self.close)

    async def _batch(self, msgs: list[Any], run: Any) -> None:
        batch = [Message(m.value() or b"", m.key(), m.topic(), m.partition(), m.offset()) for m in msgs]
        res = await self.core.process(batch)
        commit, rewind = self.next_offsets(msgs, self.ck)
        if self.eos:
            try:
                self.producer.begin_transaction()
                self.publish(res)
                await run(None, self.producer.send_offsets_to_transaction, commit,
                          self.consumer.consumer_group_metadata(), 30)
                await run(None, self.producer.commit_transaction, 60)
            except self.ck.KafkaException as e:
                log.error("transaction failed, aborting and rewinding: %s", e)
                if e.args[0].txn_requires_abort():
                    await run(None, self.producer.abort_transaction, 30)
                for tp in rewind:
                    self.consumer.seek(tp)
                return
        else:
            self.publish(res)
            left = await run(None, self.producer.flush, 60)
            if left or self.failures:
                # NOTE: not committed: the batch is re-delivered after the restart
                raise DeliveryFailed(f"{left} outputs undelivered, {len(self.failures)} failed: {self.failures[:1]}")
            try:
                await run(None, lambda: self.consumer.commit(offsets=commit, asynchronous=False))
            except self.ck.KafkaException as e:  # partitions moved meanwhile: their new owner re-scores the batch
                log.warning("commit refused (rebalance?); the batch will be re-delivered: %s", e)
        self.batches += 1
        log.debug("batch %d: %d messages, %d results, %d dead letters", self.batches, len(msgs), len(res.results), len(res.dead))

    def _assigned(self, consumer: Any, partitions: list[Any]) -> None:
        log.info("assigned %s", sorted(tp.partition for tp in partitions))
        if self.core.events is not None and partitions:
            # the entity state of a partition taken over: rebuilt before any record past the commit is scored
            for tp in consumer.committed(partitions, timeout=30):
                n = self.core.events.restore(tp.partition, self._history(tp.topic, tp.partition, tp.offset))
                log.info("feature state of partition %d restored: %d events below offset %d", tp.partition, n, tp.offset)

    def _history(self, topic: str, partition: int, end: int) -> list[bytes]:
        """The values of ``topic``/``partition`` from its first retained record up to ``end`` (exclusive)."""
        if end <= 0:  # nothing committed yet (OFFSET_INVALID is negative)
            return []
        reader = self.ck.Consumer({"bootstrap.servers": self.bootstrap, "group.id": f"{self.opts.group}-replay",
                                   "enable.auto.commit": False, "isolation.level": "read_committed",
                                   "enable.partition.eof": True, "auto.offset.reset": "earliest"})
        try:
            # NOTE: from the beginning, not the low watermark (Tansu's watermarks are not reliable)
            reader.assign([self.ck.TopicPartition(topic, partition, self.ck.OFFSET_BEGINNING)])
            values: list[bytes] = []
            offset = 0
            deadline = time.monotonic() + 60
            while offset < end:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"replay of partition {partition} stalled at offset {offset} of {end}")
                for m in reader.consume(1000, 1.0):
                    if m.error() is not None:
                        continue
                    if m.offset() < end:
                        values.append(m.value() or b"")
                    offset = m.offset() + 1
            return values
        finally:
            reader.close()

    def _revoked(self, consumer: Any, partitions: list[Any]) -> None:
        # called inside consume(): the previous batch is already published and committed
        log.info("revoked %s", sorted(tp.partition for tp in partitions))
        if self.core.events is not None:
            self.core.events.drop(tp.partition for tp in partitions)

    def _lag(self) -> None:
        if self.metrics is None or time.monotonic() - self._last_lag < 5.0:
            return
        self._last_lag = time.monotonic()
        try:
            for tp in self.consumer.position(self.consumer.assignment()):
                _, high = self.consumer.get_watermark_offsets(tp, cached=True)
                if tp.offset >= 0 and high >= 0:
                    self.metrics.lag.labels(tp.topic, str(tp.partition)).set(max(0, high - tp.offset))
        except self.ck.KafkaException as e:
            log.debug("lag not available: %s", e)

    def close(self) -> None:
        self.producer.flush(30)
        self.consumer.close()  # leaves the group: its partitions move at once
