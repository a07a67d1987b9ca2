"""A broker consumer's process: the data plane the gRPC worker builds (hot reload of the alias,
thresholds in force, rollout, drift metrics), a transport loop on it, gRPC health for probes, and a
graceful stop on SIGTERM / SIGINT (the batch in flight is published and committed first)."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from outlierd.core.registry import Registry
from outlierd.monitoring.metrics import ServiceMetrics

from .app import _background, _monitor_factory, _start_feedback, _start_rollout
from .consume import ConsumeCore, ConsumeMetrics
from .health import HealthServicer
from .plane import DataPlane, ServedModel
from .reload import DevicePolicy, ModelSlot
from .settings import ServeSettings

log = logging.getLogger("outlierd.consume")


async def start_plane(settings: ServeSettings, metrics: ServiceMetrics | None = None, *,
                      capture: bool = False) -> DataPlane:
    """Load the model the alias points at and start a data plane on it. ``capture``: scored records
    (ids, scores, flags, version; shadow scores too) go to ``settings.feedback_store`` exactly as
    ``serve`` writes them, so replicas and consumers fill one store; :func:`close_plane` closes it."""
    registry = Registry(settings.registry)
    policy = DevicePolicy(settings.device, settings.gpu_backend, settings.gpu_min_rows)
    loop = asyncio.get_running_loop()
    writer = None
    if capture and settings.capture:
        writer, feedback = await _start_feedback(settings, metrics, model=settings.model)
        feedback.close()  # a consumer takes no labels: only the capture writer is kept
    slot = ModelSlot(registry, settings.model, settings.alias, metrics, monitor_factory=_monitor_factory(settings, metrics),
                     policy=policy)
    handle = await loop.run_in_executor(None, slot.load_initial)
    if writer is not None:
        await loop.run_in_executor(None, writer.prepare, handle.model.n_features)
    rollout = await _start_rollout(settings, registry, slot, metrics, policy, writer)
    plane = DataPlane([ServedModel(slot, rollout)], threads=settings.threads, max_batch=settings.max_batch,
                      max_queue_records=settings.max_queue_records, max_request_records=settings.max_request_records,
                      max_id_bytes=settings.max_id_bytes, metrics=metrics, capture=writer)
    plane.start()
    return plane


async def close_plane(plane: DataPlane) -> None:
    """Close the plane, then its capture writer (after the batcher: its last offers get written)."""
    await plane.close()
    if plane.capture is not None:
        await asyncio.get_running_loop().run_in_executor(None, plane.capture.close)


async def run_consumer(settings: ServeSettings, make_loop: Callable[[ConsumeCore], Any], *, fmt: str = "json",
                       alerts: bool = True, health_port: int = 0, metrics: ServiceMetrics | None = None,
                       consume_metrics: ConsumeMetrics | None = None, stop: asyncio.Event | None = None) -> None:
    """Run ``make_loop(core).run(stop)`` until SIGTERM / SIGINT (or ``stop``), then close the plane.
    ``health_port``: serve grpc.health.v1 there (0: none), SERVING while the loop runs."""
    plane = await start_plane(settings, metrics, capture=True)
    core = ConsumeCore(plane, settings.model, fmt=fmt, alerts=alerts, metrics=consume_metrics)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = None
    health = HealthServicer()
    if health_port:
        server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(health, server)
        server.add_insecure_port(f"{settings.host}:{health_port}")
        await server.start()
    watcher = loop.create_task(_background(plane, settings), name="outlierd-reload")
    transport = make_loop(core)

    async def ready() -> None:
        await health.set("", health_pb2.HealthCheckResponse.SERVING)

    try:
        await transport.run(stop, on_ready=lambda: loop.create_task(ready()))
    finally:
        await health.enter_graceful_shutdown()
        watcher.cancel()
        if server is not None:
            await server.stop(1.0)
        await close_plane(plane)
        log.info("consumer stopped")
