"""Raw events in: a ScoreRequest's ``arrow_events`` (an Arrow IPC stream) through the feature engine
to the feature rows the data plane scores.

One engine per served model name holds the per-entity state; a reload to a version with the same
feature spec (same digest) keeps it (the new version's learned categories are used from then on),
a different spec starts a fresh state. Features are computed on the event loop, synchronously in
``_start``: the messages of a stream reach the state in order (the kernel costs about a
microsecond per event).

State is per process. With ``--workers`` > 1 the kernel's SO_REUSEPORT spreads connections over
the workers, so an entity's events would land in several states: raw events are then refused
(FAILED_PRECONDITION, saying why); scale raw-event serving with replicas of one worker each, each
fed the events of its own entities (a Kafka partition per replica, or a router hashing the entity key).

Checkpoints (``--feature-state-dir``): every ``--feature-checkpoint-s`` and on a graceful stop the
state is written to ``<dir>/<model>.features.npz`` (temporary file, fsync, rename) and restored at
start when its spec digest matches; events after the last checkpoint are lost on a crash (their
entities' windows start again from the checkpoint).
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from outlierd.core.features import EventError, FeatureEngine, FeatureSpec, FittedCategories, load_features

from .errors import RequestError
from .reload import ModelHandle

log = logging.getLogger("outlierd.events")


class EventFeatures:
    """Raw events -> feature rows for the data plane's handles (one engine per model name)."""

    def __init__(self, state_dir: Path | None = None, checkpoint_s: float = 30.0, metrics: Any = None, workers: int = 1) -> None:
        self.state_dir = Path(state_dir) if state_dir is not None else None
        self.checkpoint_s = checkpoint_s
        self.metrics = metrics
        self.workers = workers
        self._engines: dict[str, FeatureEngine] = {}
        self._specs: dict[int, tuple[ModelHandle, tuple[FeatureSpec, FittedCategories] | None]] = {}
        self._counted: dict[str, dict[str, int]] = {}

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
        return None if self.state_dir is None else self.state_dir / f"{name}.features.npz"

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

    def features(self, handle: ModelHandle, data: bytes, n_ids: int = 0) -> np.ndarray:
        """float64 features of the events in ``data`` (Arrow IPC stream), in order; updates the state.
        A RequestError names the column and the row of a bad event; the state is then unchanged."""
        loaded = self.spec_of(handle)
        if loaded is None:
            raise RequestError(f"model {handle.name!r} version {handle.version} takes feature vectors (values or raw_values), "
                               "not arrow_events: it was trained without a feature spec (outlierd train --events --features)",
                               reason="events")
        if self.workers > 1:
            raise RequestError("arrow_events need the entity state of one process: this server runs several workers "
                               "(--workers), which would split an entity's events between states; serve raw events with "
                               "--workers 1 per replica and route each entity's events to one replica", code="FAILED_PRECONDITION",
                               reason="events")
        try:
            with pa.ipc.open_stream(pa.py_buffer(data)) as reader:
                table = reader.read_all()
        except (pa.ArrowException, OSError) as e:
            raise RequestError(f"arrow_events is not an Arrow IPC stream: {e}", reason="decode") from e
        if n_ids and n_ids != table.num_rows:
            raise RequestError(f"ids has {n_ids} entries for {table.num_rows} events: send one id per event or none", reason="ids")
        spec, fitted = loaded
        engine = self.engine(handle, spec, fitted)
        try:
            X = engine.transform(table, fitted=fitted)
        except EventError as e:
            raise RequestError(f"arrow_events: {e.message}", reason="events") from None
        self._count(handle.name, engine, table.num_rows)
        return X

    def _count(self, name: str, engine: FeatureEngine, n: int) -> None:
        m = self.metrics
        if m is None or not hasattr(m, "feature_events"):
            return
        stats = engine.stats()
        seen = self._counted.setdefault(name, {"evicted": 0, "late": 0})
        m.feature_events.labels(name).inc(n)
        m.feature_entities.labels(name).set(stats["entities"])
        m.feature_state_bytes.labels(name).set(stats["bytes"])
        for key, counter in (("evicted", m.feature_evicted), ("late", m.feature_late)):
            if stats[key] > seen[key]:
                counter.labels(name).inc(stats[key] - seen[key])
                seen[key] = stats[key]

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
