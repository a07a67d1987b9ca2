"""Immutable model handles and the hot-reloading slot that holds the current one.

A worker's slot watches its alias. On a change: load (checksums, schema) -> verify (probe scores)
-> warm up -> atomic swap of the handle. Batches already running keep the handle they took, so
in-flight work finishes on the old version. A version that fails any step is refused, counted and
logged, and the old one keeps serving; it is not retried until the alias moves again.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Any
from collections.abc import Callable

import numpy as np

from outlierd.core.backends import SERIAL_MAX_ROWS, resolve_device
from outlierd.core.errors import ArtifactError, OutlierdError
from outlierd.core.model import Model, load_model
from outlierd.core.registry import Registry

log = logging.getLogger("outlierd.reload")
# outlierd_model_reloads_total{result}: ok, refused (a version that fails), fallback (serving an
# earlier version at start), registry_error (the watcher could not read the registry)
RELOAD_RESULTS = ("ok", "refused", "fallback", "registry_error")
REGISTRY_LOG_INTERVAL_S = 60.0


class _RateLimited:
    """Log one line at most every ``interval_s``; the next says how many were left out."""

    def __init__(self, logger: logging.Logger, interval_s: float) -> None:
        self.logger, self.interval_s = logger, interval_s
        self._last = -float("inf")
        self._skipped = 0

    def warning(self, fmt: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self._last < self.interval_s:
            self._skipped += 1
            return
        if self._skipped:
            fmt += f" ({self._skipped} more like it in the last %.0fs)"
            args = (*args, now - self._last)
        self._last, self._skipped = now, 0
        self.logger.warning(fmt, *args)


@dataclass(frozen=True)
class ModelHandle:
    name: str
    version: int
    alias: str
    model: Model
    loaded_at: float
    monitor: Any = None  # monitoring.stream.ServingMonitor of this version, or None
    gpu_model: Model | None = None  # the same version on CUDA, when the device policy uses a GPU
    gpu_min_rows: int = 0  # batches at least this large go to gpu_model
    threshold_value: float | None = None  # a published threshold version's value; None: the artifact's own
    threshold_version: int = 0  # 0: the artifact's own threshold (Registry.threshold)

    @property
    def threshold(self) -> float:
        return self.model.threshold if self.threshold_value is None else self.threshold_value


@dataclass(frozen=True)
class DevicePolicy:
    """Where batches run: ``cpu``; ``cuda`` (every batch on the GPU); ``auto`` (batches of at least
    ``gpu_min_rows`` on the GPU when one is usable, smaller ones on the Numba kernel). Measure the
    crossover with ``benchmarks/gpu_suite.py`` and set ``--gpu-min-rows`` from it."""

    device: str = "auto"
    gpu_backend: str = "onnx"
    gpu_min_rows: int = 65536


def load_handle(registry: Registry, name: str, alias: str, version: int, policy: DevicePolicy = DevicePolicy()) -> ModelHandle:
    """Load and warm up one version (blocking: run it off the event loop)."""
    model = registry.load(name, version)  # verifies checksums and probe scores
    # First call per kernel (serial / parallel), dtype and writability compiles the kernel or loads
    # it from Numba's cache: do it now, not on a live request. raw_values arrive as read-only views.
    for rows in (1, SERIAL_MAX_ROWS + 1):
        warm = np.zeros((rows, model.n_features))
        model.score(warm)
        model.score(warm.astype(np.float32))
        model.score(np.frombuffer(warm.astype("<f4").tobytes(), dtype="<f4").reshape(rows, -1))
    gpu_model = None
    if policy.device != "cpu" and model.device != "cuda" and resolve_device(policy.device, policy.gpu_backend) == "cuda":
        # the same verified artifact, on the GPU; --device cuda without a usable GPU fails in resolve_device
        gpu_model = load_model(registry.path(name, version), backend=policy.gpu_backend, device="cuda")
        gpu_model.score(np.zeros((policy.gpu_min_rows, model.n_features), dtype=np.float32))
    value, tver = registry.threshold(name, version)  # a published threshold version overrides the artifact's
    return ModelHandle(name, version, alias, model, time.time(), gpu_model=gpu_model,
                       gpu_min_rows=0 if policy.device == "cuda" else policy.gpu_min_rows,
                       threshold_value=value if tver else None, threshold_version=tver)


class ModelSlot:
    """The handle a worker serves now, and the watcher that replaces it."""

    def __init__(self, registry: Registry, name: str, alias: str, metrics: Any = None,
                 monitor_factory: Callable[[ModelHandle], Any] | None = None, policy: DevicePolicy = DevicePolicy()):
        self.registry, self.name, self.alias, self.metrics = registry, name, alias, metrics
        self.policy = policy
        self.monitor_factory = monitor_factory
        if metrics is not None:  # series exist at 0 from the start, so rate() sees the first event
            for result in RELOAD_RESULTS:
                metrics.reloads.labels(name, result)
        self.current: ModelHandle | None = None
        self._refused: int | None = None  # last version refused, not retried until the alias moves
        self._refused_threshold: tuple[int, int] | None = None  # (version, threshold version) that could not be read
        self._registry_problem = _RateLimited(log, REGISTRY_LOG_INTERVAL_S)
        self.fallback = False  # serving an earlier version because the alias points at one that fails
        self.changed = asyncio.Event()

    def load_initial(self) -> ModelHandle:
        """Load the version the alias points at. When it cannot be served (it fails verification),
        serve the newest version the alias pointed at before that loads (the audit log knows
        them), say so in the log and in ``outlierd_model_reloads_total{result="fallback"}``, and
        keep watching: the refused version is not retried until the alias moves. Raises only when
        no version can be served at all."""
        version = self.registry.resolve(self.name, self.alias)
        try:
            handle = load_handle(self.registry, self.name, self.alias, version, self.policy)
        except Exception as first:
            handle = self._fallback(version, first)
        self._swap(handle)
        assert self.current is not None
        return self.current

    def _fallback(self, refused: int, error: Exception) -> ModelHandle:
        self._refused = refused
        if self.metrics is not None:
            self.metrics.reloads.labels(self.name, "refused").inc()
        tried = []
        for version in self.registry.last_good(self.name, self.alias, refused=(refused,)):
            tried.append(version)
            try:
                handle = load_handle(self.registry, self.name, self.alias, version, self.policy)
            except Exception as e:
                log.error("fallback refused model=%s version=%d error=%s", self.name, version, e)
                continue
            self.fallback = True
            if self.metrics is not None:
                self.metrics.reloads.labels(self.name, "fallback").inc()
            log.error("alias points at a version that cannot serve model=%s alias=%s version=%d error=%s; serving the "
                      "last good version=%d instead until the alias moves", self.name, self.alias, refused, error, version)
            return handle
        if not tried:
            raise error
        raise ArtifactError(
            f"alias {self.alias!r} of {self.name!r} points at version {refused}, which cannot serve ({error}); "
            f"no earlier version it pointed at loads either (tried {', '.join(map(str, tried))})") from error

    def _with_monitor(self, handle: ModelHandle) -> ModelHandle:
        if self.monitor_factory is None:
            return handle
        try:
            return dataclasses.replace(handle, monitor=self.monitor_factory(handle))
        except (ValueError, OutlierdError) as e:  # e.g. an artifact without a reference profile: serve, unmonitored
            log.warning("drift monitoring off model=%s version=%d reason=%s", handle.name, handle.version, e)
            return handle

    def _swap(self, handle: ModelHandle) -> None:
        handle = self._with_monitor(handle)
        old = self.current
        self.current = handle
        if self.metrics is not None:
            if old is not None:
                self.metrics.model_info.labels(old.name, str(old.version), old.alias).set(0)
            self.metrics.model_info.labels(handle.name, str(handle.version), handle.alias).set(1)
        log.info("serving model=%s version=%d alias=%s threshold=%.6g threshold_version=%d", handle.name, handle.version,
                 handle.alias, handle.threshold, handle.threshold_version)

    async def _check_threshold(self, cur: ModelHandle) -> bool:
        """A new threshold version of the served version: swap in a handle with the same loaded model
        (and monitor) and the new threshold; no reload. True if the handle changed."""
        loop = asyncio.get_running_loop()
        try:
            n = await loop.run_in_executor(None, self.registry.threshold_version, self.name, cur.version)
        except Exception as e:  # registry unreachable: keep serving
            self._registry_error("threshold check failed model=%s version=%d error=%s", self.name, cur.version, e)
            return False
        if n == cur.threshold_version or (cur.version, n) == self._refused_threshold:
            return False
        try:
            value, n = await loop.run_in_executor(None, self.registry.threshold, self.name, cur.version)
        except Exception as e:  # unreadable threshold file: keep the threshold in force
            self._refused_threshold = (cur.version, n)
            log.error("threshold refused model=%s version=%d error=%s; still using threshold=%.6g threshold_version=%d",
                      self.name, cur.version, e, cur.threshold, cur.threshold_version)
            return False
        if self.current is not cur:  # the version moved while we read: the next check looks again
            return False
        self.current = dataclasses.replace(cur, threshold_value=value if n else None, threshold_version=n)
        log.info("threshold model=%s version=%d alias=%s threshold=%.6g threshold_version=%d (was %.6g, %d)", self.name,
                 cur.version, self.alias, self.current.threshold, n, cur.threshold, cur.threshold_version)
        self.changed.set()
        return True

    def _registry_error(self, fmt: str, *args: Any) -> None:
        """A registry problem seen by the watcher (unreachable, a dangling alias, a garbled
        aliases.json): counted every time (``result="registry_error"``), logged at most once per
        ``REGISTRY_LOG_INTERVAL_S`` (the watcher looks 4 times a second)."""
        if self.metrics is not None:
            self.metrics.reloads.labels(self.name, "registry_error").inc()
        self._registry_problem.warning(fmt, *args)

    async def check(self) -> bool:
        """Look at the alias once; swap in a new version if it moved. True if the handle changed."""
        loop = asyncio.get_running_loop()
        try:
            version = await loop.run_in_executor(None, self.registry.resolve, self.name, self.alias)
        except Exception as e:  # registry unreachable or alias removed: keep serving
            self._registry_error("alias check failed model=%s alias=%s error=%s", self.name, self.alias, e)
            return False
        cur = self.current
        if cur is not None and version == cur.version:
            self.fallback = False  # the alias came back to the version served
            return await self._check_threshold(cur)
        if version == self._refused:
            return False
        t0 = time.perf_counter()
        try:
            handle = await loop.run_in_executor(None, load_handle, self.registry, self.name, self.alias, version, self.policy)
        except Exception as e:
            self._refused = version
            if self.metrics is not None:
                self.metrics.reloads.labels(self.name, "refused").inc()
            log.error("reload refused model=%s version=%d error=%s; still serving version=%s",
                      self.name, version, e, cur.version if cur else None)
            return False
        self._refused = None
        self.fallback = False
        self._swap(handle)
        if self.metrics is not None:
            self.metrics.reloads.labels(self.name, "ok").inc()
        log.info("reloaded model=%s version=%d in %.3fs", self.name, version, time.perf_counter() - t0)
        self.changed.set()
        return True
