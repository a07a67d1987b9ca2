"""Raw events through a broker consumer: a model with a feature spec takes one raw event per JSON
message (``{"id", <the spec's entity, time and field columns>}``) and the feature engine turns it
into the row the data plane scores.

Entity state lives with the partition: producers key events by entity, so an entity's events are
in one partition, in order. Each assigned partition has its own :class:`FeatureEngine`; when a
consumer takes a partition over (a rebalance, a crash of its previous owner) it rebuilds that
partition's state by replaying the partition from its first retained record up to the committed
offset before scoring anything past it, so the features equal an offline replay of the whole
stream. (The replay reads the partition's retained history: keep the input topic's retention at
least the spec's longest window, or longer for the ``new_for_entity`` / ``since_last`` memory.)
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from outlierd.core.features import EventError, FeatureEngine, FeatureSpec, FittedCategories, decode_events

from .consume import Message, MessageError


class PartitionFeatures:
    """Per-partition feature engines of one spec."""

    def __init__(self, spec: FeatureSpec, fitted: FittedCategories) -> None:
        self.spec, self.fitted = spec, fitted
        self.engines: dict[int, FeatureEngine] = {}

    def engine(self, partition: int) -> FeatureEngine:
        engine = self.engines.get(partition)
        if engine is None:
            engine = self.engines[partition] = FeatureEngine(self.spec, self.fitted)
        return engine

    def decode(self, msg: Message) -> tuple[str, dict[str, Any]]:
        """``(id, event)`` of one message, checked against the spec (MessageError naming the column)."""
        try:
            obj = json.loads(msg.value)
        except (ValueError, UnicodeDecodeError) as e:
            raise MessageError(f"not JSON: {e}", "decode") from None
        if not isinstance(obj, dict):
            raise MessageError(f"expected a JSON object (one raw event); got {type(obj).__name__}", "decode")
        rid = obj.get("id")
        if rid is None:
            rid = (msg.key or b"").decode("utf-8", "replace")
        try:
            decode_events(pa.Table.from_pylist([obj]), self.spec)  # the one event alone: its error is its own
        except EventError as e:
            raise MessageError(f"event: {e.message}", "events") from None
        except (pa.ArrowException, TypeError, ValueError) as e:
            raise MessageError(f"event: {e}", "type") from None
        return str(rid), obj

    def features(self, partitions: Sequence[int], events: Sequence[dict[str, Any]]) -> np.ndarray:
        """float64 features of ``events`` (checked by :meth:`decode`), each applied in order to its
        partition's state."""
        out = np.empty((len(events), len(self.spec.output_names)))
        parts = np.asarray(partitions)
        for p in np.unique(parts):
            rows = np.flatnonzero(parts == p)
            out[rows] = self._apply(int(p), [events[int(i)] for i in rows])
        return out

    def _apply(self, partition: int, events: list[dict[str, Any]]) -> np.ndarray:
        table = pa.Table.from_pylist(events)
        return self.engine(partition).transform_batch(decode_events(table, self.spec), self.fitted)

    def restore(self, partition: int, values: Iterable[bytes]) -> int:
        """A fresh state for ``partition`` from its records before the committed offset (dead letters
        skipped, as they were when scored); the number of events applied."""
        self.engines.pop(partition, None)
        good = []
        for value in values:
            try:
                good.append(self.decode(Message(value))[1])
            except MessageError:
                continue
        for i in range(0, len(good), 4096):
            self._apply(partition, good[i:i + 4096])
        self.engine(partition)
        return len(good)

    def drop(self, partitions: Iterable[int]) -> None:
        for p in partitions:
            self.engines.pop(p, None)
