"""Champion / challenger rollout inside a worker: the split router, the challenger slot, shadow scoring.

Modes (``--rollout``):

* ``off``: only the champion alias is served.
* ``shadow``: every message is answered by the champion; once its result is known, the same records
  are queued for the challenger on a separate shadow thread (coalesced into batches), scored there
  and captured with ``role="challenger"`` -- never returned. Shadow work is bounded: when the shadow
  thread falls behind, records are dropped and counted, champion traffic never waits for it.
* ``split``: a share of the traffic is answered by the challenger. A response names the one version
  that scored all its records, so whole messages are routed, by a stable hash of the message's
  first record id (``--split-key id``; messages without ids go by ``request_id``) or of the
  ``request_id`` (``--split-key request``). The hash is blake2b (never Python's salted ``hash()``),
  so a record id goes to the same side in every worker, process and restart.

The challenger is an ordinary hot-reloading slot watching the ``challenger`` alias: no alias, no
challenger (champion only); a version that fails to load, or whose features differ from the
champion's, is refused and never touches champion traffic.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
import time
import weakref
from collections import deque
from typing import Any
from collections.abc import Callable, Iterable, Sequence

import numpy as np
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge

from outlierd.core.errors import ArtifactError, InvalidInputError, ModelNotFoundError
from outlierd.core.registry import CHALLENGER, CHAMPION

from .batcher import PARALLEL_MIN_ROWS
from .reload import ModelHandle, ModelSlot, load_handle

log = logging.getLogger("outlierd.rollout")
MODES = ("off", "shadow", "split")
SPLIT_KEYS = ("id", "request")
_SCALE = float(2**64)


# ---------------------------------------------------------------------------------------------
# the split router
# ---------------------------------------------------------------------------------------------


def route_point(key: str | bytes) -> float:
    """A stable point in [0, 1) for ``key``: the first 8 bytes of its blake2b digest over 2**64."""
    data = key.encode() if isinstance(key, str) else bytes(key)
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big") / _SCALE


def to_challenger(key: str | bytes, share: float) -> bool:
    """True when ``key`` belongs to the ``share`` of keys routed to the challenger."""
    return route_point(key) < share


def challenger_mask(keys: Iterable[str | bytes], share: float) -> np.ndarray:
    """:func:`to_challenger` over many keys, as a bool array."""
    return np.fromiter((route_point(k) < share for k in keys), dtype=bool)


def route_key(ids: Sequence[str], request_id: int, key: str = "id") -> str:
    """The routing key of a message: its first record id (``key="id"``, when it has ids) or its
    ``request_id`` as decimal text."""
    if key == "id" and len(ids):
        return ids[0]
    return str(request_id)


def split_key(req: Any, key: str = "id") -> str:
    """:func:`route_key` of a ScoreRequest (or anything with ``ids`` and ``request_id``)."""
    return route_key(req.ids, req.request_id, key)


# ---------------------------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------------------------


class RolloutMetrics:
    """Rollout metrics (names are a public contract). One instance per collector registry."""

    _by_registry: weakref.WeakKeyDictionary[CollectorRegistry, RolloutMetrics] = weakref.WeakKeyDictionary()

    def __init__(self, registry: CollectorRegistry | None = None):
        kw: dict[str, Any] = {"registry": registry} if registry is not None else {}
        self.records = Counter("outlierd_rollout_records_total",
                               "Records scored by role: champion / challenger answered, or shadow (challenger, not returned).",
                               ["model", "role"], **kw)
        self.shadow_dropped = Counter("outlierd_shadow_dropped_total",
                                      "Records not shadow-scored because the shadow thread was behind (or it failed).",
                                      ["model", "reason"], **kw)
        # the version each alias serves is outlierd_model_info{alias}; these say which threshold it uses
        self.threshold = Gauge("outlierd_threshold", "Threshold in force (score >= threshold is anomalous), by alias.",
                               ["model", "alias"], multiprocess_mode="liveall", **kw)
        self.threshold_version = Gauge("outlierd_threshold_version", "Threshold version in force (0: the artifact's own), by alias.",
                                       ["model", "alias"], multiprocess_mode="liveall", **kw)

    @classmethod
    def for_service(cls, metrics: Any) -> RolloutMetrics | None:
        """The rollout metrics living beside a ``ServiceMetrics`` (on its ``registry`` attribute when
        it has one, else the default registry); None without metrics."""
        if metrics is None:
            return None
        registry = getattr(metrics, "registry", None) or REGISTRY
        found = cls._by_registry.get(registry)
        if found is None:
            found = cls._by_registry[registry] = cls(registry)
        return found

    def show(self, handle: ModelHandle | None) -> None:
        """Export the threshold (and its version) a slot's handle uses now."""
        if handle is not None:
            self.threshold.labels(handle.name, handle.alias).set(handle.threshold)
            self.threshold_version.labels(handle.name, handle.alias).set(handle.threshold_version)


# ---------------------------------------------------------------------------------------------
# the challenger slot
# ---------------------------------------------------------------------------------------------


class ChallengerSlot(ModelSlot):
    """A :class:`ModelSlot` on the ``challenger`` alias that may be empty: ``current`` is None while
    the alias does not exist or only points at refused versions. Loading never raises."""

    def __init__(self, registry, name: str, champion: ModelSlot, metrics: Any = None, policy=None, alias: str = CHALLENGER):
        kw = {"policy": policy} if policy is not None else {}
        super().__init__(registry, name, alias, metrics, **kw)
        self.champion = champion

    def _compatible(self, handle: ModelHandle) -> None:
        champ = self.champion.current
        if champ is None:
            return
        if handle.model.n_features != champ.model.n_features or list(handle.model.feature_names) != list(champ.model.feature_names):
            raise ArtifactError(f"its features ({handle.model.n_features}) differ from champion version {champ.version}'s "
                             f"({champ.model.n_features}): requests could not be scored by both")

    def _load(self, version: int) -> ModelHandle:
        handle = load_handle(self.registry, self.name, self.alias, version, self.policy)
        self._compatible(handle)
        return handle

    def _drop(self, why: str) -> None:
        old, self.current = self.current, None
        if old is not None:
            if self.metrics is not None:
                self.metrics.model_info.labels(old.name, str(old.version), old.alias).set(0)
            log.info("challenger off model=%s (was version=%d): %s", self.name, old.version, why)
            self.changed.set()

    def load_initial(self) -> ModelHandle | None:  # type: ignore[override]
        try:
            version = self.registry.resolve(self.name, self.alias)
        except ModelNotFoundError:
            log.info("no challenger model=%s alias=%s: champion only", self.name, self.alias)
            return None
        try:
            self._swap(self._load(version))
        except Exception as e:
            self._refused = version
            if self.metrics is not None:
                self.metrics.reloads.labels(self.name, "refused").inc()
            log.error("challenger refused model=%s version=%d error=%s; champion only", self.name, version, e)
        return self.current

    async def check(self) -> bool:
        loop = asyncio.get_running_loop()
        try:
            version = await loop.run_in_executor(None, self.registry.resolve, self.name, self.alias)
        except ModelNotFoundError:  # alias removed (or never set): no challenger
            self._refused = None
            was = self.current is not None
            self._drop("alias removed")
            return was
        except Exception as e:  # registry unreachable: keep what we have
            log.warning("alias check failed model=%s alias=%s error=%s", self.name, self.alias, e)
            return False
        cur = self.current
        if cur is not None and version == cur.version:
            return await self._check_threshold(cur)
        if version == self._refused:
            return False
        try:
            handle = await loop.run_in_executor(None, self._load, version)
        except Exception as e:
            self._refused = version
            if self.metrics is not None:
                self.metrics.reloads.labels(self.name, "refused").inc()
            log.error("challenger refused model=%s version=%d error=%s; %s", self.name, version, e,
                      f"still shadowing version={cur.version}" if cur else "champion only")
            return False
        self._refused = None
        self._swap(handle)
        if self.metrics is not None:
            self.metrics.reloads.labels(self.name, "ok").inc()
        self.changed.set()
        return True


# ---------------------------------------------------------------------------------------------
# shadow scoring
# ---------------------------------------------------------------------------------------------


class ShadowScorer:
    """A thread that scores queued records with the challenger and captures them, off the response
    path. ``offer`` never blocks: beyond ``max_records`` waiting, records are dropped and counted."""

    def __init__(self, sink: Any, metrics: RolloutMetrics | None = None, *, max_batch: int = 1024, max_records: int = 65536):
        self.sink = sink  # monitoring.capture.CaptureWriter: offer(handle, role, ids, X, scores, flagged, latency_us, request_id)
        self.metrics = metrics
        self.max_batch = max_batch
        self.max_records = max_records
        self._queue: deque[tuple[ModelHandle, np.ndarray, Sequence[str], int, Any]] = deque()
        self._queued = 0
        self._cond = threading.Condition()
        self._closed = False
        self.scored = 0  # records shadow-scored (for tests and logs)
        self._thread = threading.Thread(target=self._run, name="outlierd-shadow", daemon=True)
        self._thread.start()

    def offer(self, handle: ModelHandle, X: np.ndarray, ids: Sequence[str] = (), request_id: int = 0, champion_sel: Any = None) -> bool:
        """Queue ``X`` (records with ``ids``, one per record or none, of message ``request_id``) for
        the challenger ``handle``. ``champion_sel``: the champion's capture selection of the same
        message (its sampled records are the challenger's sample too, so compare can join them).
        False (and counted) when the shadow queue is full."""
        n = X.shape[0]
        with self._cond:
            if self._closed or (self._queued and self._queued + n > self.max_records):
                if self.metrics is not None:
                    self.metrics.shadow_dropped.labels(handle.name, "behind").inc(n)
                return False
            self._queue.append((handle, X, ids, request_id, champion_sel))
            self._queued += n
            self._cond.notify()
        return True

    def _take(self) -> list[tuple[ModelHandle, np.ndarray, Sequence[str], int, Any]] | None:
        with self._cond:
            while not self._queue and not self._closed:
                self._cond.wait()
            if not self._queue:
                return None
            items = [self._queue.popleft()]
            rows = items[0][1].shape[0]
            while self._queue and self._queue[0][0] is items[0][0] and rows + self._queue[0][1].shape[0] <= self.max_batch:
                item = self._queue.popleft()
                rows += item[1].shape[0]
                items.append(item)
            self._queued -= rows
            return items

    def _run(self) -> None:
        while True:
            items = self._take()
            if items is None:
                return
            handle = items[0][0]
            try:
                X = items[0][1] if len(items) == 1 else np.concatenate([it[1] for it in items])
                t0 = time.perf_counter()
                scores = handle.model.score(X, parallel=X.shape[0] > PARALLEL_MIN_ROWS)  # as the champion's batches
                latency_us = (time.perf_counter() - t0) * 1e6 / max(1, X.shape[0])
                flagged = scores >= handle.threshold
                if self.metrics is not None:
                    self.metrics.records.labels(handle.name, "shadow").inc(X.shape[0])
                start = 0
                for _, Xi, ids, request_id, champion_sel in items:
                    n = Xi.shape[0]
                    if self.sink is not None:
                        self.sink.offer(handle, CHALLENGER, ids, Xi, scores[start:start + n], flagged[start:start + n],
                                        latency_us, request_id, sample=self.sink.sampled(champion_sel, n))
                    start += n
                self.scored += X.shape[0]
            except Exception:  # the shadow must never disturb serving: count, log, go on
                log.exception("shadow scoring failed model=%s version=%d", handle.name, handle.version)
                if self.metrics is not None:
                    self.metrics.shadow_dropped.labels(handle.name, "error").inc(sum(it[1].shape[0] for it in items))

    def close(self, timeout: float = 5.0) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout)


# ---------------------------------------------------------------------------------------------
# the data plane's hooks
# ---------------------------------------------------------------------------------------------


class Rollout:
    """What the data plane asks per message: which handle answers (``route``) and what happens after
    the champion answered (``after``: shadow scoring)."""

    def __init__(self, mode: str, share: float, key: str, champion: ModelSlot, challenger: ChallengerSlot | None,
                 shadow: ShadowScorer | None = None, metrics: RolloutMetrics | None = None):
        if mode not in MODES:
            raise InvalidInputError(f"rollout mode must be one of {', '.join(MODES)}; got {mode!r}")
        self.mode, self.share, self.key = mode, share, key
        self.champion, self.challenger, self.shadow, self.metrics = champion, challenger, shadow, metrics
        self._counters: dict[tuple[str, str], Any] = {}

    def route(self, ids: Sequence[str], request_id: int, handle: ModelHandle) -> ModelHandle:
        """The handle that answers a message with these ``ids`` and ``request_id``: the champion's
        ``handle``, or in split mode the challenger's for the routed share (when one is loaded)."""
        if self.mode == "split" and self.challenger is not None:
            chal = self.challenger.current
            if chal is not None and to_challenger(route_key(ids, request_id, self.key), self.share):
                return chal
        return handle

    def after(self, ids: Sequence[str], request_id: int, X: np.ndarray, handle: ModelHandle) -> Callable[[Any], None] | None:
        """Count the records by role; in shadow mode, return the hook that queues them for the
        challenger once the champion has scored them (the batcher calls it on the scoring thread
        with the champion's capture selection, after the answer: the response never waits for it);
        otherwise None."""
        if self.metrics is not None and X.shape[0]:
            role = CHALLENGER if handle.alias == CHALLENGER else CHAMPION
            counter = self._counters.get((handle.name, role))
            if counter is None:  # labels() takes a lock: once per (model, role)
                counter = self._counters[(handle.name, role)] = self.metrics.records.labels(handle.name, role)
            counter.inc(X.shape[0])
        if self.mode != "shadow" or self.shadow is None or self.challenger is None or not X.shape[0]:
            return None
        chal = self.challenger.current
        if chal is None:
            return None
        shadow = self.shadow  # ids: e.g. the message's repeated field, read in the shadow thread

        def then(champion_sel: Any) -> None:
            # the champion's capture selection: the challenger's captures sample the same records
            shadow.offer(chal, X, ids, request_id, champion_sel)

        return then

    async def tick(self) -> None:
        """The background tick: watch the challenger alias; export thresholds in force."""
        if self.challenger is not None:
            await self.challenger.check()
            chal = self.challenger.current
            if chal is not None:
                try:  # the champion may have moved to other features since the challenger loaded
                    self.challenger._compatible(chal)
                except ArtifactError as e:
                    self.challenger._refused = chal.version
                    self.challenger._drop(f"version {chal.version} refused: {e}")
        if self.metrics is not None:
            self.metrics.show(self.champion.current)
            if self.challenger is not None:
                self.metrics.show(self.challenger.current)

    def close(self) -> None:
        if self.shadow is not None:
            self.shadow.close()
