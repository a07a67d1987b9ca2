"""Raw events in: a ScoreRequest's ``arrow_events`` (an Arrow IPC stream) through the feature engine
to the feature rows the data plane scores.

One engine per served model name holds the per-entity state; a reload to a version with the same
feature spec (same digest) keeps it (the new version's learned categories are used from then on),
a different spec starts a fresh state. Features are computed on the event loop, synchronously in
``_start``: the messages of a stream reach the state in order (the kernel costs about a
microsecond per event).

State is per process. With ``--workers`` > 1 each entity has one owner worker (its key hash modulo
the number of workers): a worker computes the rows it owns and forwards the rest to their owners
(``event_routing``). Several replicas do not share state: feed each replica the events of its own
entities (a Kafka partition per replica, or a load balancer hashing the entity key).

Checkpoints (``--feature-state-dir``): every ``--feature-checkpoint-s`` and on a graceful stop the
state is written to ``<dir>/<model>.features.npz`` (temporary file, fsync, rename) and restored at
start when its spec digest matches; events after the last checkpoint are lost on a crash (their
entities' windows start again from the checkpoint).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from outlierd.core.features import EventError, FeatureEngine, FeatureSpec, FittedCategories, load_features
from outlierd.core.features import kernel as K
from outlierd.core.features.engine import take_batch
from outlierd.core.features.events import MessageDecoder, RawMessage

from outlierd.monitoring.categorical import CategoryMonitor

from .event_routing import EventRouter

from .errors import RequestError
from .reload import ModelHandle

log = logging.getLogger("outlierd.events")


class EventFeatures:
    """Raw events -> feature rows for the data plane's handles (one engine per model name)."""

    def __init__(self, state_dir: Path | None = None, checkpoint_s: float = 30.0, metrics: Any = None, workers: int = 1,
                 index: int = 0) -> None:
        self.state_dir = Path(state_dir) if state_dir is not None else None
        self.checkpoint_s = checkpoint_s
        self.metrics = metrics
        self.workers, self.index = workers, index
        self.router: EventRouter | None = None
        self._engines: dict[str, FeatureEngine] = {}
        self._specs: dict[int, tuple[ModelHandle, tuple[FeatureSpec, FittedCategories] | None]] = {}
        self._counted: dict[str, dict[str, int]] = {}
        self._children: dict[str, tuple[Any, ...]] = {}
        self._monitors: dict[str, tuple[FittedCategories, CategoryMonitor]] = {}
        self._decoders: dict[str, MessageDecoder] = {}  # per spec digest: the schema of its last message

    def spec_of(self, handle: ModelHandle) -> tuple[FeatureSpec, FittedCategories] | None:
        """The handle's feature spec and learned categories (None: it takes feature vectors)."""
        cached = self._specs.get(id(handle))
        if cached is None or cached[0] is not handle:
            if len(self._specs) > 8:
                self._specs.clear()
            cached = (handle, load_features(handle.model.path))
            self._specs[id(handle)] = cached
        return cached[1]

    def _path(self, name: str) -> Path | None:
        if self.state_dir is None:
            return None
        # with several workers each holds its own entities: one file per worker of that many
        return self.state_dir / (f"{name}.features.npz" if self.workers == 1 else f"{name}.features.w{self.index}of{self.workers}.npz")

    async def start_routing(self, port: int, current: Callable[[str], ModelHandle]) -> None:
        """With several workers: serve this worker's entities to the others (``current(model)``: the
        handle whose spec the owned rows of that model are computed with)."""
        if self.workers > 1:
            self.router = EventRouter(self.index, self.workers, port, lambda model, table: self.local(current(model), table))
            await self.router.start()

    async def stop_routing(self) -> None:
        if self.router is not None:
            await self.router.stop()

    def engine(self, handle: ModelHandle, spec: FeatureSpec, fitted: FittedCategories) -> FeatureEngine:
        """The state for ``handle``'s model: kept across versions with the same spec."""
        engine = self._engines.get(handle.name)
        if engine is not None and engine.spec.digest == spec.digest:
            return engine
        if engine is not None:
            log.warning("feature spec changed model=%s version=%d: entity state starts empty", handle.name, handle.version)
        engine = FeatureEngine(spec, fitted)
        path = self._path(handle.name)
        if path is not None and path.exists():
            try:
                with np.load(path, allow_pickle=False) as z:
                    restored = engine.restore({k: z[k] for k in z.files})
                log.info("feature state %s model=%s entities=%d", "restored" if restored else "not restored (another spec)",
                         handle.name, engine.stats()["entities"])
            except (OSError, ValueError, KeyError) as e:
                log.error("feature state checkpoint unreadable, starting empty path=%s error=%s", path, e)
        self._engines[handle.name] = engine
        return engine

    def _loaded(self, handle: ModelHandle) -> tuple[FeatureSpec, FittedCategories]:
        loaded = self.spec_of(handle)
        if loaded is None:
            raise RequestError(f"model {handle.name!r} version {handle.version} takes feature vectors (values or raw_values), "
                               "not arrow_events: it was trained without a feature spec (outlierd train --events --features)",
                               reason="events")
        return loaded

    def features(self, handle: ModelHandle, data: bytes, n_ids: int = 0) -> np.ndarray | asyncio.Future:
        """float64 features of the events in ``data`` (Arrow IPC stream), in order; updates the state.
        A RequestError names the column and the row of a bad event; the state is then unchanged.
        With several workers, a future when some rows belong to other workers (sent now, in order)."""
        spec, fitted = self._loaded(handle)
        decoder = self._decoders.get(spec.digest)
        if decoder is None:
            if len(self._decoders) > 8:
                self._decoders.clear()
            decoder = self._decoders[spec.digest] = MessageDecoder(spec)
        try:
            table = decoder.read(data)  # located in the bytes (the schema parsed once), or read by Arrow
        except (pa.ArrowException, OSError) as e:
            raise RequestError(f"arrow_events is not an Arrow IPC stream: {e}", reason="decode") from e
        if n_ids and n_ids != table.num_rows:
            raise RequestError(f"ids has {n_ids} entries for {table.num_rows} events: send one id per event or none", reason="ids")
        try:
            batch = decoder.decode(table)  # the whole message checked here: errors name its rows
        except EventError as e:
            raise RequestError(f"arrow_events: {e.message}", reason="events") from None
        engine = self.engine(handle, spec, fitted)
        self._monitor(handle.name, fitted, batch)
        router = self.router
        if router is None:
            X = engine.transform_batch(batch, fitted)
            self._count(handle.name, engine, batch.n)
            return X
        owners = router.owners(batch.entity)
        mine = np.flatnonzero(owners == router.index)
        if mine.size == batch.n:
            X = engine.transform_batch(batch, fitted)
            self._count(handle.name, engine, batch.n)
            return X
        local = engine.transform_batch(take_batch(batch, mine), fitted) if mine.size else None
        self._count(handle.name, engine, int(mine.size))
        sent = []
        if isinstance(table, RawMessage):
            table = table.table()
        for owner in range(router.n):
            if owner != router.index:
                rows = np.flatnonzero(owners == owner)
                if rows.size:
                    sent.append((rows, router.send(owner, handle.name, table.take(pa.array(rows)))))

        async def assemble() -> np.ndarray:
            out = np.empty((batch.n, len(spec.output_names)))
            if local is not None:
                out[mine] = local
            for rows, fut in sent:
                out[rows] = router.features(await fut, int(rows.size))
            return out

        return asyncio.ensure_future(assemble())

    def _monitor(self, name: str, fitted: FittedCategories, batch: Any) -> None:
        """Categorical drift and unseen values of the served events, per window (gauges)."""
        if self.metrics is None or not hasattr(self.metrics, "category_psi") or not fitted.columns:
            return
        current = self._monitors.get(name)
        if current is None or (current[0] is not fitted and current[0].digest != fitted.digest):
            current = self._monitors[name] = (fitted, CategoryMonitor(fitted.columns))  # new reference: new windows
        for d in current[1].observe({c: batch.categories[c].hashes() for c in fitted.columns if c in batch.categories}):
            self.metrics.category_unseen.labels(name, d.column).set(d.unseen)
            self.metrics.category_psi.labels(name, d.column).set(d.psi)

    def local(self, handle: ModelHandle, table: pa.Table) -> np.ndarray:
        """Features of rows this worker owns, sent by another worker (already checked there)."""
        spec, fitted = self._loaded(handle)
        engine = self.engine(handle, spec, fitted)
        X = engine.transform(table, fitted=fitted)
        self._count(handle.name, engine, table.num_rows)
        return X

    def _count(self, name: str, engine: FeatureEngine, n: int) -> None:
        m = self.metrics
        if m is None or not hasattr(m, "feature_events"):
            return
        children = self._children.get(name)
        if children is None:  # labels() takes a lock: the children once per model
            children = self._children[name] = tuple(metric.labels(name) for metric in (
                m.feature_events, m.feature_entities, m.feature_state_bytes, m.feature_evicted, m.feature_late))
        meta = engine.state["meta"]
        seen = self._counted.setdefault(name, {"evicted": 0, "late": 0})
        children[0].inc(n)
        children[1].set(int(meta[K.LIVE]))
        children[2].set(engine.state_bytes)
        for key, at, child in (("evicted", K.EVICTED, children[3]), ("late", K.LATE, children[4])):
            value = int(meta[at])
            if value > seen[key]:
                child.inc(value - seen[key])
                seen[key] = value

    # -- checkpoints ---------------------------------------------------------------------------------

    def snapshots(self) -> list[tuple[Path, dict[str, np.ndarray]]]:
        """Copies of every engine's state with their checkpoint paths (taken on the event loop, so
        no batch is half applied)."""
        out = []
        for name, engine in self._engines.items():
            path = self._path(name)
            if path is not None:
                out.append((path, engine.snapshot()))
        return out

    @staticmethod
    def write(snapshots: list[tuple[Path, dict[str, np.ndarray]]]) -> None:
        for path, arrays in snapshots:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)  # type: ignore[arg-type]
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)

    async def checkpoint(self) -> None:
        snaps = self.snapshots()
        if snaps:
            await asyncio.get_running_loop().run_in_executor(None, self.write, snaps)

    async def run_checkpoints(self) -> None:
        """Checkpoint every ``checkpoint_s`` seconds until cancelled."""
        if self.state_dir is None or self.checkpoint_s <= 0:
            return
        while True:
            await asyncio.sleep(self.checkpoint_s)
            try:
                await self.checkpoint()
            except OSError as e:
                log.error("feature state checkpoint failed dir=%s error=%s", self.state_dir, e)
