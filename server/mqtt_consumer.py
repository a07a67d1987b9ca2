"""MQTT in, scores and alerts out (paho-mqtt, the ``mqtt`` extra).

A persistent session (``clean_session=False``, a fixed client id) subscribed at QoS 1 with manual
acknowledgements: a message is PUBACKed only after its result (and alert, or dead letter) has been
acknowledged by the broker, so a consumer crash or a broker restart re-delivers it rather than
losing it. paho reconnects with backoff (0.1 s doubling to 5 s) and re-sends its unacknowledged
publications; the broker re-delivers what was not acknowledged. Duplicates are possible (at-least-
once), losses are not.

Results go to ``--out``'s topic; alerts to ``<alerts topic>/<device>``, where ``<device>`` is the part of the
input topic the filter's wildcards matched (``devices/+/telemetry`` and ``devices/d7/telemetry``:
``d7``). Dead letters go to ``--dlq`` with the error in the payload (MQTT 3.1.1 has no headers):
``{"error", "reason", "topic", "payload"}``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

from outlierd.core.errors import InvalidInputError

from .consume import ConsumeCore, Message, Output

log = logging.getLogger("outlierd.consume.mqtt")


def require_paho() -> Any:
    try:
        import paho.mqtt.client as mqtt
    except ImportError as e:
        raise InvalidInputError("mqtt:// needs the mqtt extra: pip install 'outlierd[mqtt]' (paho-mqtt)") from e
    return mqtt


def parse_url(url: str) -> tuple[str, int, str]:
    """``mqtt://HOST[:PORT]/TOPIC`` -> (host, port, topic; ``+`` and ``#`` kept)."""
    parts = urlsplit(url.replace("#", "%23"))
    topic = unquote(parts.path.lstrip("/"))
    if parts.scheme != "mqtt" or not parts.hostname or not topic:
        raise InvalidInputError(f"expected mqtt://HOST:PORT/TOPIC; got {url!r}")
    return parts.hostname, parts.port or 1883, topic


def device_of(topic_filter: str, topic: str) -> str:
    """The levels of ``topic`` that the wildcards of ``topic_filter`` matched, joined by ``/``
    (the whole topic when the filter has no wildcard)."""
    f, t = topic_filter.split("/"), topic.split("/")
    out = []
    for i, level in enumerate(f):
        if level == "#":
            out.extend(t[i:])
            break
        if level == "+" and i < len(t):
            out.append(t[i])
    return "/".join(out) or topic


@dataclass
class MqttOptions:
    source: str
    out: str
    alerts: str | None = None
    dlq: str | None = None
    client_id: str = "outlierd"
    qos: int = 1
    max_inflight: int = 2000
    batch_wait_s: float = 0.05
    publish_timeout_s: float = 120.0


class MqttConsumerLoop:
    """Receive on paho's network thread, score in batches on the event loop, publish, then ack."""

    def __init__(self, core: ConsumeCore, opts: MqttOptions, metrics: Any = None) -> None:
        mqtt = require_paho()
        self.core, self.opts, self.metrics = core, opts, metrics
        self.host, self.port, self.filter = parse_url(opts.source)
        self.out_topic = self._topic(opts.out)
        self.alert_topic = self._topic(opts.alerts) if opts.alerts else None
        self.dlq_topic = self._topic(opts.dlq) if opts.dlq else None
        self.inbox: queue.Queue = queue.Queue()
        self.connected = threading.Event()
        self.seq = 0
        self.generation = 0  # connections so far: a message's mid is only valid on the connection it came on
        self.acked = 0
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=opts.client_id, clean_session=False,
                             protocol=mqtt.MQTTv311, manual_ack=True)
        client.max_inflight_messages_set(1000)
        client.max_queued_messages_set(0)
        client.reconnect_delay_set(min_delay=0.1, max_delay=5)  # paho doubles the delay up to the max
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        self.published: set[int] = set()  # mids the broker acknowledged (set.add: atomic, no lock with paho's)
        self.client = client

    def _topic(self, url: str) -> str:
        host, port, topic = parse_url(url)
        if (host, port) != (self.host, self.port):
            raise InvalidInputError(f"{url}: outputs go to the source's broker ({self.host}:{self.port})")
        return topic

    # paho's network thread ------------------------------------------------------------------------

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if reason.is_failure:
            log.warning("connect refused: %s", reason)
            return
        log.info("connected to %s:%d session_present=%s", self.host, self.port, flags.session_present)
        self.generation += 1
        client.subscribe(self.filter, qos=self.opts.qos)
        self.connected.set()

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        self.connected.clear()
        log.warning("disconnected (%s); reconnecting", reason)

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason: Any, properties: Any) -> None:
        self.published.add(mid)

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        self.inbox.put((self.generation, msg))

    # the event loop --------------------------------------------------------------------------------

    def _take(self) -> list[Any]:
        """Up to max_inflight messages: blocks up to batch_wait_s for the first, then takes what is there."""
        try:
            first = self.inbox.get(timeout=self.opts.batch_wait_s)
        except queue.Empty:
            return []
        got = [first]
        while len(got) < self.opts.max_inflight:
            try:
                got.append(self.inbox.get_nowait())
            except queue.Empty:
                break
        return got

    async def run(self, stop: asyncio.Event, on_ready: Callable[[], None] | None = None) -> None:
        loop = asyncio.get_running_loop()
        self.client.connect_async(self.host, self.port, keepalive=10)
        self.client.loop_start()
        try:
            await loop.run_in_executor(None, self.connected.wait, 30)
            if on_ready is not None:
                on_ready()
            while not stop.is_set():
                raw = await loop.run_in_executor(None, self._take)
                if raw:
                    await self._batch(raw, loop)
        finally:
            self.client.disconnect()
            self.client.loop_stop()

    async def _batch(self, raw: list[Any], loop: asyncio.AbstractEventLoop) -> None:
        msgs = []
        for _, m in raw:
            self.seq += 1
            msgs.append(Message(m.payload, m.topic.encode(), m.topic, 0, self.seq))
        res = await self.core.process(msgs)
        infos = []
        qos = self.opts.qos
        self.published.clear()
        for o in res.results:
            infos.append(self.client.publish(self.out_topic, o.value, qos=qos))
        if self.alert_topic is not None:
            for o in res.alerts:
                device = device_of(self.filter, (o.key or b"").decode())
                infos.append(self.client.publish(f"{self.alert_topic}/{device}", o.value, qos=qos))
        if self.dlq_topic is not None:
            for o in res.dead:
                infos.append(self.client.publish(self.dlq_topic, self._dead(o), qos=qos))
        await loop.run_in_executor(None, self._wait_published, infos)
        for gen, m in raw:  # only now: the broker has the outputs
            # NOTE: a message from an earlier connection is not acked: its mid may now name another
            # message; the broker re-delivers it (a duplicate, never a loss)
            if m.qos > 0 and gen == self.generation:
                self.client.ack(m.mid, m.qos)
        self.acked += len(raw)

    @staticmethod
    def _dead(o: Output) -> bytes:
        h = dict(o.headers)
        try:
            payload: Any = o.value.decode()
        except UnicodeDecodeError:
            payload = {"base64": base64.b64encode(o.value).decode()}
        return json.dumps({"error": h["error"].decode(), "reason": h["error.reason"].decode(),
                           "topic": h["source.topic"].decode(), "payload": payload}).encode()

    def _wait_published(self, infos: list[Any]) -> None:
        """Until the broker acknowledged every publication. NOTE: by the PUBACK callback, not
        ``info.is_published()``: a publication queued while disconnected keeps rc NO_CONN (and
        is_published raises) though paho sends it after the reconnect."""
        deadline = time.monotonic() + self.opts.publish_timeout_s
        if self.opts.qos == 0:
            return
        for info in infos:
            while info.mid not in self.published:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the broker did not acknowledge results within {self.opts.publish_timeout_s:g} s")
                time.sleep(0.01)
