"""The broker consumers' core, transport-free: a batch of messages in, results, alerts and dead
letters out, scored through the same :class:`DataPlane` as the gRPC server (hot reload, thresholds
in force, shadow scoring, capture and drift all apply).

A message is one JSON object (``--format json``: ``{"id": "t-1", "f0": 0.3, ...}``; no ``"id"``:
the message key is the id) or one Arrow IPC stream of many records (``--format arrow``). Each good
record gives one result ``{"id", "score", "anomalous", "model", "version", "threshold_version"}``
in input order; flagged ones also give an alert with the top-k ``explanation``. A message that
cannot be scored (bad JSON, a missing or non-numeric feature, an unknown model) becomes one dead
letter naming the error; the records around it are scored as usual.

The transports (``kafka_consumer``, ``mqtt_consumer``) own delivery: they publish what
:meth:`ConsumeCore.process` returns and only then acknowledge the input (commit the offsets, PUBACK).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import RequestError
from .plane import DataPlane, echo
from .reload import ModelHandle
from .results import Explain

FORMATS = ("json", "arrow")


@dataclass(slots=True)
class Message:
    """One message from a broker: ``value`` (the payload), ``key`` (None: none), and where it came
    from (Kafka: topic, partition, offset; MQTT: topic and a sequence number)."""

    value: bytes
    key: bytes | None = None
    topic: str = ""
    partition: int = 0
    offset: int = 0


@dataclass(slots=True)
class Output:
    """A record to publish: ``key`` (the input's, so an entity's results share its partition),
    ``value`` (JSON bytes) and, for dead letters, ``headers``."""

    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]] = field(default_factory=list)
    record_id: str = ""


@dataclass(slots=True)
class BatchResult:
    results: list[Output]
    alerts: list[Output]
    dead: list[Output]
    records: int  # good records scored


class MessageError(ValueError):
    """A message that cannot be scored; ``reason`` labels the dead-letter metric and header."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def _number(v: Any, name: str) -> float:
    # bool is an int in Python but never a feature value; a string is not silently parsed
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise MessageError(f"feature {name!r} must be a number; got {echo(json.dumps(v))}", "type")
    return float(v)


def decode_json(msg: Message, names: Sequence[str], model: str) -> tuple[str, list[float]]:
    """``(id, features in the model's order)`` of a JSON message, or MessageError."""
    try:
        obj = json.loads(msg.value)
    except (ValueError, UnicodeDecodeError) as e:
        raise MessageError(f"not JSON: {e}", "decode") from e
    if not isinstance(obj, dict):
        raise MessageError(f"expected a JSON object of features; got {type(obj).__name__}", "decode")
    wanted = obj.get("model")
    if wanted not in (None, "", model):
        raise MessageError(f"unknown model {echo(str(wanted))}; this consumer scores {model!r}", "unknown_model")
    rid = obj.get("id")
    if rid is None:
        rid = msg.key.decode("utf-8", "replace") if msg.key else f"{msg.topic}/{msg.partition}/{msg.offset}"
    try:
        row = [_number(obj[n], n) for n in names]
    except KeyError as e:
        missing = [n for n in names if n not in obj]
        raise MessageError(f"missing feature(s) {', '.join(map(repr, missing[:5]))}: the model expects {len(names)} "
                           f"features ({', '.join(names[:5])}{', …' if len(names) > 5 else ''})", "n_features") from e
    return str(rid), row


def decode_arrow(msg: Message, names: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """``(ids, (n, d) float32)`` of an Arrow IPC stream message, or MessageError."""
    import pyarrow as pa
    import pyarrow.ipc as ipc

    try:
        table = ipc.open_stream(pa.py_buffer(msg.value)).read_all()
    except (pa.ArrowInvalid, OSError) as e:
        raise MessageError(f"not an Arrow IPC stream: {e}", "decode") from e
    missing = [n for n in names if n not in table.column_names]
    if missing:
        raise MessageError(f"missing column(s) {', '.join(map(repr, missing[:5]))}", "n_features")
    try:
        X = np.column_stack([table.column(n).to_numpy(zero_copy_only=False).astype(np.float32) for n in names])
    except (ValueError, TypeError, pa.ArrowInvalid) as e:
        raise MessageError(f"non-numeric feature column: {e}", "type") from e
    if "id" in table.column_names:
        ids = [str(v) for v in table.column("id").to_pylist()]
    else:
        base = msg.key.decode("utf-8", "replace") if msg.key else f"{msg.topic}/{msg.partition}/{msg.offset}"
        ids = [f"{base}#{i}" for i in range(table.num_rows)]
    return ids, X.reshape(table.num_rows, len(names))


def dead_letter(msg: Message, error: str, reason: str) -> Output:
    """The input, unchanged, with headers naming the error and where it came from."""
    headers = [("error", error.encode()), ("error.reason", reason.encode()), ("source.topic", msg.topic.encode()),
               ("source.partition", str(msg.partition).encode()), ("source.offset", str(msg.offset).encode())]
    return Output(msg.key, msg.value, headers)


class ConsumeCore:
    """Decode, score through ``plane`` (model ``model``: "" the plane's default), encode.
    ``alerts``: build alerts (with top-k explanations) for flagged records."""

    def __init__(self, plane: DataPlane, model: str = "", fmt: str = "json", alerts: bool = True, top_k: int = 3,
                 metrics: Any = None) -> None:
        if fmt not in FORMATS:
            raise ValueError(f"--format must be one of {', '.join(FORMATS)}; got {fmt!r}")
        self.plane, self.fmt, self.alerts, self.top_k, self.metrics = plane, fmt, alerts, top_k, metrics
        self.served = plane.resolve(model)
        self.events = None  # a model with a feature spec: raw events in, per-partition entity state
        from outlierd.core.features import load_features

        loaded = load_features(self.served.current.model.path)
        if loaded is not None:
            from .consume_events import PartitionFeatures

            if fmt != "json":
                raise ValueError("a model with a feature spec takes raw events as JSON messages (--format json)")
            self.events = PartitionFeatures(*loaded)

    async def process(self, msgs: Sequence[Message]) -> BatchResult:
        """Score a batch of messages; never raises for a bad message (it becomes a dead letter)."""
        t0 = time.perf_counter()
        handle = self.plane.route(self.served)
        names = handle.model.feature_names
        ids: list[str] = []
        keys: list[bytes | None] = []
        rows: list[Any] = []
        dead: list[Output] = []
        if self.events is not None:
            parts: list[int] = []
            for msg in msgs:
                try:
                    rid, event = self.events.decode(msg)
                except MessageError as e:
                    dead.append(dead_letter(msg, str(e), e.reason))
                    continue
                ids.append(rid)
                keys.append(msg.key)
                parts.append(msg.partition)
                rows.append(event)
            if rows:
                rows = list(self.events.features(parts, rows))
        for msg in msgs if self.events is None else ():
            try:
                if self.fmt == "json":
                    rid, row = decode_json(msg, names, self.served.name)
                    ids.append(rid)
                    keys.append(msg.key)
                    rows.append(row)
                else:
                    aids, X = decode_arrow(msg, names)
                    ids.extend(aids)
                    keys.extend([msg.key] * len(aids))
                    rows.extend(X)
            except MessageError as e:
                dead.append(dead_letter(msg, str(e), e.reason))
        results: list[Output] = []
        alerts: list[Output] = []
        if rows:
            X = np.asarray(rows, dtype=np.float32).reshape(len(rows), len(names))
            if handle.model.preprocessing.reject and not np.isfinite(X).all():
                X, ids, keys, dead = self._drop_non_finite(X, ids, keys, dead, msgs, handle)
            if len(ids):
                results, alerts = await self._score(handle, X, ids, keys)
        if self.metrics is not None:
            self.metrics.observe(len(msgs), len(results), len(dead), time.perf_counter() - t0)
        return BatchResult(results, alerts, dead, len(results))

    def _drop_non_finite(self, X, ids, keys, dead, msgs, handle: ModelHandle):
        # NOTE: JSON has no NaN, but Arrow has; a model that rejects them sends those records to the DLQ
        ok = np.isfinite(X).all(axis=1)
        for i in np.flatnonzero(~ok):
            value = json.dumps({"id": ids[i], **dict(zip(handle.model.feature_names, map(float, X[i])))}).encode()
            dead.append(dead_letter(Message(value, keys[i]), f"record {ids[i]!r} contains NaN or inf", "non_finite"))
        keep = np.flatnonzero(ok)
        return X[ok], [ids[i] for i in keep], [keys[i] for i in keep], dead

    async def _score(self, handle: ModelHandle, X: np.ndarray, ids: list[str],
                     keys: list[bytes | None]) -> tuple[list[Output], list[Output]]:
        explain = Explain(min(self.top_k, handle.model.n_features), flagged_only=True) if self.alerts else None
        try:
            res = await self.plane.submit(handle, X, ids=ids, explain=explain)
        except RequestError:
            raise
        scores = res.scores.tolist()
        flags = res.flags.tolist()
        head = {"model": res.model, "version": res.version, "threshold_version": res.handle.threshold_version}
        results = []
        alerts = []
        names = res.feature_names
        for i, rid in enumerate(ids):
            s = scores[i]
            body = {"id": rid, "score": s if math.isfinite(s) else None, "anomalous": bool(flags[i]), **head}
            key = keys[i] if keys[i] is not None else rid.encode()
            results.append(Output(key, json.dumps(body).encode(), record_id=rid))
            if flags[i] and res.explanation is not None:
                feats, contribs = res.explanation
                body["explanation"] = [{"feature": names[int(f)], "contribution": float(c)}
                                       for f, c in zip(feats[i], contribs[i]) if f >= 0]
                alerts.append(Output(key, json.dumps(body).encode(), record_id=rid))
        return results, alerts


class ConsumeMetrics:
    """The consumer's Prometheus series: records in / out / dead-lettered, batch latency, and the
    lag per partition (set by the transport). ``registry``: a CollectorRegistry (tests: a fresh one)."""

    def __init__(self, registry: Any = None) -> None:
        from prometheus_client import REGISTRY, Counter, Gauge, Histogram

        reg = REGISTRY if registry is None else registry
        self.records_in = Counter("outlierd_consume_records_in_total", "Records read from the source", registry=reg)
        self.records_out = Counter("outlierd_consume_records_out_total", "Results published", registry=reg)
        self.dead = Counter("outlierd_consume_dead_lettered_total", "Messages sent to the dead-letter topic", registry=reg)
        self.batch = Histogram("outlierd_consume_batch_seconds", "Time to decode and score one batch", registry=reg,
                               buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0))
        self.lag = Gauge("outlierd_consume_lag_records", "Records behind the partition's end", ["topic", "partition"],
                         registry=reg)

    def observe(self, n_in: int, n_out: int, n_dead: int, seconds: float) -> None:
        self.records_in.inc(n_in)
        self.records_out.inc(n_out)
        self.dead.inc(n_dead)
        self.batch.observe(seconds)
